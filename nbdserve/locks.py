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
  * A ``CoRangeLock`` operation compares only the holds and waiters filed near its range (and
    those wider than its index files by bucket), never every one in the lock: a pile-up of
    requests costs each of them O(1) when they ask for the same range, not O(waiters).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Iterable

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
    Like every lock here, waiters are never cancelled (see ``coro``).

    Cost, so that thousands of requests in flight on one image stay cheap:
      * *Quiet* (nothing exclusive held or asked for, nothing waiting: only shared holds, which
        never conflict): a shared hold is one dict entry, and no range is compared.
      * Otherwise holds and waiters are filed in four ``_Index``es (exclusive and shared, held
        and waiting) by the ``grain``-sized buckets their ranges touch, so a request compares
        only ranges near its own, and only those it could conflict with (a shared request only
        exclusive ones); a release looks only at the waiters near the freed range that it could
        have blocked.  The quiet shared holds are filed at the first exclusive request (each at
        most once).
      * An exclusive request for exactly the range of an exclusive hold or waiter (read-modify-
        writes piling up on one sector) queues behind it as a *follower*, unfiled: it could not
        be granted before that one ends, and then it takes its place (with its own token, so
        FIFO order among all requests is kept).  A pile-up of N such requests costs each
        operation O(1), not O(N).
    """

    __slots__ = ("_held_s", "_held_x", "_next", "_quiet", "_tails", "_wait_s", "_wait_x", "_waiting")

    def __init__(self, *, grain: int = 1 << 20, wide: int = 64) -> None:
        self._quiet: dict[int, tuple[int, int]] = {}  # token -> (start, end): shared holds not filed
        self._held_x, self._held_s = _Index(grain, wide), _Index(grain, wide)
        self._wait_x, self._wait_s = _Index(grain, wide), _Index(grain, wide)
        # (start, end) -> the one exclusive hold or waiter of that range (its followers queue on it)
        self._tails: dict[tuple[int, int], _Range] = {}
        self._waiting = 0  # waiters, followers included
        self._next = 0  # the last token handed out; waiters' tokens give their FIFO order

    def try_shared(self, start: int, end: int) -> int | None:
        """A shared hold if that needs no waiting (for synchronous fast paths), else None."""
        self._next += 1
        if not (self._held_x.all or self._waiting):  # quiet: nothing can conflict
            self._quiet[self._next] = (start, end)
            return self._next
        if self._blocked(start, end, False, 0):
            return None
        self._held_s.add(_Range(start, end, False, self._next, None))
        return self._next

    async def shared(self, start: int, end: int) -> int:
        token = self.try_shared(start, end)
        if token is not None:
            return token
        return await self._wait(start, end, False)

    async def exclusive(self, start: int, end: int) -> int:
        if self._quiet:  # file the quiet shared holds, so that searches see them
            quiet, self._quiet = self._quiet, {}
            for token, (s, e) in quiet.items():
                self._held_s.add(_Range(s, e, False, token, None))
        self._next += 1
        tail = self._tails.get((start, end))
        if tail is not None:  # behind the hold or waiter of this very range: follow it
            fut = asyncio.get_running_loop().create_future()
            if tail.followers is None:
                tail.followers = deque()
            tail.followers.append((self._next, fut))
            self._waiting += 1
            return await fut  # unlock (then _grant) hands over the hold
        if self._blocked(start, end, True, 0):
            return await self._wait(start, end, True)
        r = self._tails[start, end] = _Range(start, end, True, self._next, None)
        self._held_x.add(r)
        return self._next

    def unlock(self, token: int) -> None:
        if self._quiet.pop(token, None) is not None:
            return  # quiet holds exist only while nothing waits
        r = self._held_x.all.get(token) or self._held_s.all.get(token)
        if r is None:
            raise AssertionError(f"CoRangeLock: unlock of a token not held ({token})")
        if not r.exclusive:
            self._held_s.remove(r)
        else:
            self._held_x.remove(r)
            if r.followers:  # the first follower becomes the range's waiter, the rest follow it
                token, fut = r.followers.popleft()
                nxt = self._tails[r.start, r.end] = _Range(r.start, r.end, True, token, fut)
                nxt.followers = r.followers
                self._wait_x.add(nxt)
            else:
                del self._tails[r.start, r.end]
        if self._waiting:
            self._grant(r.start, r.end, r.exclusive)

    @property
    def holds(self) -> list[tuple[int, int, bool]]:
        """The holds now, as (start, end, exclusive)."""
        filed = itertools.chain(self._held_x.all.values(), self._held_s.all.values())
        return [(s, e, False) for s, e in self._quiet.values()] + [(r.start, r.end, r.exclusive) for r in filed]

    async def _wait(self, start: int, end: int, exclusive: bool) -> int:
        """Wait with the token just handed out (``_next``) until ``_grant`` hands over the hold."""
        fut = asyncio.get_running_loop().create_future()
        r = _Range(start, end, exclusive, self._next, fut)
        if exclusive:
            self._tails[start, end] = r
            self._wait_x.add(r)
        else:
            self._wait_s.add(r)
        self._waiting += 1
        return await fut

    def _blocked(self, start: int, end: int, exclusive: bool, token: int) -> bool:
        """Whether ``[start, end)`` (exclusive or not) conflicts with a hold or with a waiter
        ahead of ``token`` (a waiter's own token; 0 for a new request, behind every waiter)."""
        if self._held_x.overlaps(start, end) or self._wait_x.overlaps(start, end, token):
            return True
        # shared holds and waiters conflict only with exclusive ones
        return exclusive and (self._held_s.overlaps(start, end) or self._wait_s.overlaps(start, end, token))

    def _grant(self, freed_start: int, freed_end: int, freed_exclusive: bool) -> None:
        """A hold of ``[freed_start, freed_end)`` ended: grant, in FIFO order, every waiter that
        now conflicts neither with a hold nor with a waiter ahead of it.  Only waiters that
        overlap the freed range and conflicted with it can have become free (whatever else
        blocks a waiter still does: a waiter ahead of it granted now blocks it as a hold), so
        only those are looked at."""
        freed: dict[int, _Range] = {}
        for index in (self._wait_x, self._wait_s) if freed_exclusive else (self._wait_x,):
            for r in index.near(freed_start, freed_end):
                if r.start < freed_end and freed_start < r.end:
                    freed[r.token] = r
        for token in sorted(freed):
            r = freed[token]
            if self._blocked(r.start, r.end, r.exclusive, token):
                continue
            if r.exclusive:
                self._wait_x.remove(r)
                self._held_x.add(r)
            else:
                self._wait_s.remove(r)
                self._held_s.add(r)
            fut, r.waiter = r.waiter, None
            self._waiting -= 1
            fut.set_result(token)


class _Range:
    """A hold (``waiter`` None) or a waiting request (``waiter``: the future its hold is handed
    over by) of a ``CoRangeLock``; an exclusive one may have followers (token, future)."""

    __slots__ = ("end", "exclusive", "followers", "start", "token", "waiter")

    def __init__(self, start: int, end: int, exclusive: bool, token: int, waiter: asyncio.Future | None) -> None:
        self.start, self.end, self.exclusive, self.token, self.waiter = start, end, exclusive, token, waiter
        self.followers: deque[tuple[int, asyncio.Future]] | None = None  # made by the first one


class _Index:
    """``_Range``s filed under each ``grain``-sized bucket their range touches, or, spanning more
    than ``wide`` buckets, in one dict that every search reads; a search over more than ``wide``
    buckets reads every range."""

    __slots__ = ("all", "buckets", "grain", "wide", "wide_span")

    def __init__(self, grain: int, wide_span: int) -> None:
        self.grain = grain
        self.wide_span = wide_span
        self.all: dict[int, _Range] = {}  # token -> range
        self.buckets: dict[int, dict[int, _Range]] = {}  # bucket -> token -> range
        self.wide: dict[int, _Range] = {}

    def _span(self, start: int, end: int) -> range | None:
        first, last = start // self.grain, (end - 1) // self.grain
        return range(first, last + 1) if last - first < self.wide_span else None

    def near(self, start: int, end: int) -> Iterable[_Range]:
        """Every range that may overlap ``[start, end)`` (some more than once)."""
        if not self.all:
            return ()
        span = self._span(start, end)
        if span is None:
            return self.all.values()
        buckets = self.buckets
        return itertools.chain(self.wide.values(), *(buckets[b].values() for b in span if b in buckets))

    def overlaps(self, start: int, end: int, before: int = 0) -> bool:
        """Whether a range here overlaps ``[start, end)``; with ``before``, only ranges whose token
        is smaller count (the waiters ahead of a waiter)."""
        # A loop, not any() over a generator: this is the lock's inner loop, and the generator
        # made a release that frees many waiters take 1.7 times as long.
        for r in self.near(start, end):  # noqa: SIM110
            if r.start < end and start < r.end and (not before or r.token < before):
                return True
        return False

    def add(self, r: _Range) -> None:
        self.all[r.token] = r
        span = self._span(r.start, r.end)
        if span is None:
            self.wide[r.token] = r
            return
        for b in span:
            bucket = self.buckets.get(b)
            if bucket is None:
                bucket = self.buckets[b] = {}
            bucket[r.token] = r

    def remove(self, r: _Range) -> None:
        del self.all[r.token]
        span = self._span(r.start, r.end)
        if span is None:
            del self.wide[r.token]
            return
        for b in span:
            bucket = self.buckets[b]
            del bucket[r.token]
            if not bucket:
                del self.buckets[b]
