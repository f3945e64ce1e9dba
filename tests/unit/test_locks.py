"""CoMutex, CoQueue and CoRangeLock: FIFO hand-off, owner checks, shared/exclusive exclusion over
ranges (with a model-based property test), and the eager runner's owner identity."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdserve import coro
from nbdserve.locks import CoMutex, CoQueue, CoRangeLock


def run(main):
    return asyncio.run(main())


def test_mutex_is_fifo_and_exclusive():
    order: list[int] = []
    inside = 0

    async def worker(m: CoMutex, i: int) -> None:
        nonlocal inside
        async with m:
            inside += 1
            assert inside == 1
            await asyncio.sleep(0)
            order.append(i)
            inside -= 1

    async def main():
        m = CoMutex("t")
        await asyncio.gather(*(worker(m, i) for i in range(10)))
        assert not m.locked()

    run(main)
    assert order == list(range(10))


def test_uncontended_lock_does_not_suspend():
    """Eager requests rely on this: an uncontended lock/unlock completes synchronously."""

    async def critical(m: CoMutex) -> str:
        async with m:
            m.assert_locked()
        return "done"

    async def main():
        m = CoMutex()
        results = []
        coro.start(critical(m), lambda r, e: results.append((r, e)))
        assert results == [("done", None)]  # finished before start() returned

    run(main)


def test_unlock_by_non_owner_and_assert_locked_fail():
    async def main():
        m = CoMutex("x")
        await m.lock()

        async def other():
            with pytest.raises(AssertionError, match="non-owner"):
                m.unlock()
            with pytest.raises(AssertionError, match="does not hold"):
                m.assert_locked()

        await asyncio.create_task(other())
        m.unlock()
        with pytest.raises(AssertionError, match="unlocked"):
            m.unlock()

    run(main)


def test_recursive_lock_is_a_bug():
    async def main():
        m = CoMutex("r")
        await m.lock()
        with pytest.raises(AssertionError, match="recursive"):
            await m.lock()

    run(main)


def test_eager_runner_owner_survives_suspension():
    """A coroutine started eagerly keeps its owner identity across awaits."""

    async def holder(m: CoMutex, gate: asyncio.Future) -> None:
        async with m:
            await gate  # suspend while holding the lock
            m.assert_locked()

    async def main():
        m = CoMutex()
        gate = asyncio.get_running_loop().create_future()
        done: list = []
        coro.start(holder(m, gate), lambda r, e: done.append(e))
        assert m.locked() and not done
        gate.set_result(None)
        await asyncio.sleep(0)
        assert done == [None] and not m.locked()

    run(main)


def test_queue_wait_releases_and_reacquires_mutex():
    async def main():
        m = CoMutex()
        q = CoQueue()
        ready = False
        log = []

        async def waiter():
            async with m:
                while not ready:
                    await q.wait(m)
                m.assert_locked()
                log.append("woke")

        t = asyncio.create_task(waiter())
        await asyncio.sleep(0)
        assert len(q) == 1 and not m.locked()  # waiting released the mutex
        async with m:
            ready = True
            q.wake_all()
        await t
        assert log == ["woke"]

    run(main)


def test_range_lock_shares_excludes_overlaps_only_and_is_not_starved():
    async def main():
        lock = CoRangeLock()
        a = lock.try_shared(0, 100)
        b = lock.try_shared(50, 150)  # shared holds may overlap
        assert a is not None and b is not None
        events = []

        async def hold(name, start, end, exclusive):
            token = await (lock.exclusive if exclusive else lock.shared)(start, end)
            events.append(name)
            lock.unlock(token)

        x = asyncio.create_task(hold("x", 90, 110, True))  # overlaps both shared holds: waits
        await asyncio.sleep(0)
        assert events == []
        far = asyncio.create_task(hold("far", 200, 300, True))  # overlaps nothing: at once
        await asyncio.sleep(0)
        assert events == ["far"]
        assert lock.try_shared(100, 120) is None  # overlaps the waiting exclusive: not before it
        assert lock.try_shared(0, 10) is not None  # overlaps only shared holds: at once
        late = asyncio.create_task(hold("late", 95, 96, False))  # behind x
        await asyncio.sleep(0)
        lock.unlock(a)
        await asyncio.sleep(0)
        assert events == ["far"]  # b still overlaps x
        lock.unlock(b)
        await asyncio.gather(x, far, late)
        assert events == ["far", "x", "late"]
        assert [h[:2] for h in lock.holds] == [(0, 10)]

    run(main)


def test_range_lock_unlock_of_a_token_not_held_is_a_bug():
    lock = CoRangeLock()
    token = lock.try_shared(0, 1)
    lock.unlock(token)
    with pytest.raises(AssertionError):
        lock.unlock(token)


# A request: ((start, length), kind); then the order in which holds are released.  Some ranges
# are drawn from a short list, so that requests for exactly one range pile up (followers).
KINDS = st.sampled_from(["shared", "exclusive", "try_shared"])
RANGES = st.one_of(st.tuples(st.integers(0, 30), st.integers(1, 10)), st.sampled_from([(0, 4), (2, 4), (0, 40)]))
REQUESTS = st.lists(st.tuples(RANGES, KINDS), min_size=1, max_size=16)
# The index's bucket size and wide limit: one bucket for everything, tiny buckets, wide ranges.
GEOMETRY = st.sampled_from([(1 << 20, 64), (1, 64), (3, 2), (4, 1)])


@settings(max_examples=400, deadline=None)
@given(REQUESTS, GEOMETRY, st.randoms(use_true_random=False))
def test_range_lock_against_a_model(requests, geometry, rnd):
    """Requests made in order, holds released in a random order: at every moment no two holds
    conflict; a request is granted exactly when the model says nothing before it blocks it (no
    conflicting hold, no conflicting earlier waiter); ``try_shared`` returns None exactly when
    ``shared`` would wait (and then asks for nothing); every request is granted in the end."""

    def clash(p, q):
        return p[0] < q[1] and q[0] < p[1] and (p[2] or q[2])

    async def main():
        grain, wide = geometry
        lock = CoRangeLock(grain=grain, wide=wide)

        async def ask(start, end, kind):
            if kind == "try_shared":
                return lock.try_shared(start, end)
            return await (lock.exclusive if kind == "exclusive" else lock.shared)(start, end)

        futures = {i: asyncio.ensure_future(ask(s, s + n, kind)) for i, ((s, n), kind) in enumerate(requests)}
        granted: dict[int, int] = {}  # request index -> token
        gone: set[int] = set()  # released, or a try_shared that got None
        while len(gone) < len(requests):
            await asyncio.sleep(0)  # every request is made (in order) in the first turn
            refused = set()
            for i, f in futures.items():
                if f.done() and i not in granted and i not in gone:
                    if f.result() is None:
                        refused.add(i)
                    else:
                        granted[i] = f.result()
            holds = lock.holds
            assert not any(clash(p, q) for k, p in enumerate(holds) for q in holds[k + 1 :])
            # The model: walking the requests in order, one is held exactly when it clashes with no
            # earlier request that is held or waiting (released or refused ones no longer count).
            ahead = []
            for i, ((start, n), kind) in enumerate(requests):
                if i in gone:
                    continue
                me = (start, start + n, kind == "exclusive")
                blocked = any(clash(me, o) for o in ahead)
                if i in refused:
                    assert blocked, (i, requests)
                    continue
                assert (i in granted) == (not blocked), (i, requests, gone)
                ahead.append(me)
            gone |= refused
            live = [i for i in granted if i not in gone]
            if not live:
                assert len(gone) == len(requests), "nothing held, yet requests wait"
                break
            i = rnd.choice(live)
            lock.unlock(granted[i])
            gone.add(i)
        assert lock.holds == []

    run(main)
