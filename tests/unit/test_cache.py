"""The shared cluster cache: hits and misses, pinning, the byte budget, dependency-ordered
write-back.  A LocalFile subclass records the order of writes and syncs (it still does them)."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from nbdserve.cache import ClusterCache
from nbdserve.errors import CorruptImage
from nbdserve.storage.local import LocalFile

TABLE = 4096


class RecordingFile(LocalFile):
    def __init__(self, path: str) -> None:
        super().__init__(path, readonly=False)
        self.events: list[tuple[str, int]] = []

    def write(self, offset: int, data) -> None:
        self.events.append(("write", offset))
        super().write(offset, data)

    async def flush(self) -> None:
        self.events.append(("sync", -1))
        await super().flush()


@pytest.fixture
def file(tmp_path):
    p = tmp_path / "f.img"
    with open(p, "wb") as f:
        for i in range(64):
            f.write(bytes([i]) * TABLE)
    bf = RecordingFile(str(p))
    yield bf
    bf.close_now()


def kind(cache: ClusterCache, f: LocalFile, name: str = "t"):
    return cache.kind(f, name=name, size=TABLE, decode=bytearray, encode=bytes)


def test_miss_then_hit_and_peek(file):
    async def main():
        c = ClusterCache(1 << 20)
        k = kind(c, file)
        e = await c.get(k, 3 * TABLE)
        assert e.value == bytes([3]) * TABLE and e.pins == 1
        c.release(e)
        assert c.peek(k, 3 * TABLE) is e
        assert c.peek(k, 4 * TABLE) is None
        e2 = await c.get(k, 3 * TABLE)
        assert e2 is e
        c.release(e2)
        s = c.stats()
        assert (s["misses"], s["hits"]) == (1, 2)

    asyncio.run(main())


def test_budget_evicts_lru_but_never_pinned(file):
    async def main():
        c = ClusterCache(4 * TABLE)
        k = kind(c, file)
        pinned = await c.get(k, 0)  # stays pinned throughout
        for i in range(1, 20):
            c.release(await c.get(k, i * TABLE))
            assert c.used <= 4 * TABLE
        assert c.peek(k, 0) is pinned
        assert c.stats()["evictions"] >= 15
        # the most recent tables survive, the oldest unpinned went first
        assert c.peek(k, 19 * TABLE) is not None
        assert c.peek(k, 1 * TABLE) is None

    asyncio.run(main())


def test_dirty_entries_written_back_after_their_dependencies(file):
    async def main():
        c = ClusterCache(1 << 20)
        refs = kind(c, file, "refcount")
        l2 = kind(c, file, "l2")
        rb = await c.get(refs, 10 * TABLE)
        t = await c.get(l2, 20 * TABLE)
        rb.value[0] = 0xAA
        c.mark_dirty(rb)
        t.value[0] = 0xBB
        c.mark_dirty(t, after=[rb])
        c.release(rb)
        c.release(t)
        file.events.clear()
        await c.flush(file)
        # refcount block, then a sync, then the L2 table, then the final sync
        assert file.events == [("write", 10 * TABLE), ("sync", -1), ("write", 20 * TABLE), ("sync", -1)]
        assert os.pread(file.fd, 1, 10 * TABLE) == b"\xaa" and os.pread(file.fd, 1, 20 * TABLE) == b"\xbb"
        assert not rb.dirty and not t.dirty

    asyncio.run(main())


def test_sync_before_forces_a_sync_first(file):
    async def main():
        c = ClusterCache(1 << 20)
        l2 = kind(c, file, "l2")
        t = await c.get(l2, 5 * TABLE)
        t.value[1] = 7
        c.mark_dirty(t, sync_before=True)
        c.release(t)
        file.events.clear()
        await c.writeback([t])
        assert file.events == [("sync", -1), ("write", 5 * TABLE), ("sync", -1)]

    asyncio.run(main())


def test_eviction_writes_back_dirty_entries_with_dependencies(file):
    async def main():
        c = ClusterCache(2 * TABLE)  # the two dirty tables fill it: new ones force write-back
        refs = kind(c, file, "refcount")
        l2 = kind(c, file, "l2")
        t = await c.get(l2, 2 * TABLE)  # least recently used: the first victim
        rb = await c.get(refs, 1 * TABLE)
        rb.value[0] = 1
        c.mark_dirty(rb)
        t.value[0] = 2
        c.mark_dirty(t, after=[rb])
        c.release(rb)
        c.release(t)
        file.events.clear()
        for i in range(30, 36):
            c.release(await c.get(l2, i * TABLE))
        # evicting the L2 table first wrote (and synced) the refcount block it depends on
        assert file.events[:3] == [("write", 1 * TABLE), ("sync", -1), ("write", 2 * TABLE)]
        assert os.pread(file.fd, 1, 2 * TABLE) == b"\x02"

    asyncio.run(main())


def test_put_new_is_dirty_and_pinned_and_table_past_eof_is_corrupt(file):
    async def main():
        c = ClusterCache(1 << 20)
        k = kind(c, file)
        e = c.put_new(k, 100 * TABLE, bytearray(b"\x05" * TABLE))
        assert e.dirty and e.pins == 1
        c.release(e)
        await c.flush(file)
        assert os.pread(file.fd, 1, 100 * TABLE) == b"\x05"
        with pytest.raises(CorruptImage, match="past end of file"):
            await c.get(k, 1000 * TABLE)
        assert c.peek(k, 1000 * TABLE) is None  # a failed load leaves nothing behind

    asyncio.run(main())


def test_entries_of_two_files_share_one_budget(tmp_path, file):
    other_path = tmp_path / "g.img"
    other_path.write_bytes(os.urandom(16 * TABLE))

    async def main():
        other = LocalFile(str(other_path), readonly=True)
        c = ClusterCache(6 * TABLE)
        ka, kb = kind(c, file), kind(c, other)
        for i in range(8):
            c.release(await c.get(ka, i * TABLE))
            c.release(await c.get(kb, i * TABLE))
        assert c.used <= 6 * TABLE
        c.discard_storage(other)
        assert all(c.peek(kb, i * TABLE) is None for i in range(8))
        other.close_now()

    asyncio.run(main())


class LaterFile(LocalFile):
    """A file whose reads complete on a later loop turn, as RBD's and S3's do; the first
    ``failures`` reads then fail with EIO.  Counts the reads it was asked for."""

    def __init__(self, path: str, failures: int = 0) -> None:
        super().__init__(path, readonly=True)
        self.failures = failures
        self.reads = 0

    def read(self, offset: int, buf):
        self.reads += 1
        return self._later(offset, buf)

    async def _later(self, offset: int, buf) -> None:
        await asyncio.sleep(0)
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EIO, "the read failed")
        super().read(offset, buf)


def test_concurrent_misses_share_one_read_and_a_failed_one_leaves_nothing(tmp_path, file):
    """Storage that completes later (RBD, S3): concurrent misses on one table wait for a single
    read.  When it fails, every waiter gets the error and no entry or budget is left behind; the
    next misses read again, and a waiter cancelled while waiting drops its pin."""

    async def main():
        slow = LaterFile(file.name, failures=1)
        try:
            c = ClusterCache(1 << 20)
            k = kind(c, slow)
            results = await asyncio.gather(c.get(k, 5 * TABLE), c.get(k, 5 * TABLE), return_exceptions=True)
            assert [type(r) for r in results] == [OSError, OSError]
            assert slow.reads == 1 and c.used == 0 and c.peek(k, 5 * TABLE) is None

            first, second, third = (asyncio.ensure_future(c.get(k, 5 * TABLE)) for _ in range(3))
            await asyncio.sleep(0)  # all three asked: the second and third wait on the first's read
            third.cancel()
            e1, e2, e3 = await asyncio.gather(first, second, third, return_exceptions=True)
            assert isinstance(e3, asyncio.CancelledError)
            assert e1 is e2 and e1.value == bytes([5]) * TABLE and e1.pins == 2
            assert slow.reads == 2 and c.used == TABLE
            c.release(e1)
            c.release(e2)
        finally:
            slow.close_now()

    asyncio.run(main())
