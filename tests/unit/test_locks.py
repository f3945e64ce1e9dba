"""CoMutex, CoQueue and CoRwLock: FIFO hand-off, owner checks, reader/writer exclusion, and the
eager runner's owner identity."""

from __future__ import annotations

import asyncio

import pytest

from nbdserve import coro
from nbdserve.locks import CoMutex, CoQueue, CoRwLock


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


def test_rwlock_readers_share_writer_excludes_and_is_not_starved():
    async def main():
        rw = CoRwLock()
        await rw.rdlock()
        await rw.rdlock()
        assert rw.readers == 2
        events = []

        async def writer():
            await rw.wrlock()
            events.append("w")
            rw.unlock()

        async def late_reader():
            await rw.rdlock()
            events.append("r")
            rw.unlock()

        w = asyncio.create_task(writer())
        await asyncio.sleep(0)
        r = asyncio.create_task(late_reader())
        await asyncio.sleep(0)
        assert events == []  # writer waits for readers; the late reader queues behind the writer
        rw.unlock()
        rw.unlock()
        await asyncio.gather(w, r)
        assert events == ["w", "r"]
        assert rw.readers == 0 and not rw.write_locked

    run(main)
