"""The shared cluster cache: one per process, one byte budget, for every image and connection.

Owns decoded metadata tables (qcow2 L2 tables and refcount blocks, QED L2 tables, VHD/VHDX BAT
pages, ...).  A driver describes each kind of table once with a ``TableKind`` (the storage it lives in,
size, decode, encode) and then asks for tables by host offset.  All I/O goes through the storage
contract (``storage.base``), so tables of images on any backend are cached alike.

Rules (the contract drivers rely on):
  * ``get`` returns the entry **pinned**; ``release`` unpins it.  Pinned entries are never evicted,
    so the budget may be exceeded while many are pinned.  ``peek`` returns an entry unpinned: use
    it only until the next ``await``.
  * Concurrent misses on one (kind, offset) share a single read (single flight) when the read
    must wait; a read that completes at once needs none (nobody else runs meanwhile).
  * A driver changes ``entry.value`` and calls ``mark_dirty`` **without an await in between**, and
    only while holding its own metadata lock.
  * Dirty entries are written back in dependency order: ``mark_dirty(e, after=[d])`` means ``d``
    must be on stable storage before ``e`` is written (qcow2: a refcount block before the L2 table
    that uses the cluster).  ``sync_before=True`` means "flush the storage before writing this
    entry" (e.g. data written by copy-on-write must be durable before the L2 entry points to it).
  * ``flush(storage)`` writes back every entry of that storage dirty when it starts, then
    flushes the storage.
  * Eviction is LRU over unpinned entries; clean ones go first, dirty ones are written back
    (with their dependencies) before they are dropped.

Lock order: callers may hold their driver CoMutex; the cache takes no coroutine lock of its own,
its bookkeeping is synchronous.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from .errors import CorruptImage
from .storage.base import Storage

DEFAULT_CACHE_SIZE = 64 << 20


class TableKind:
    """One kind of fixed-size metadata table in one file (e.g. "L2 tables of disk.qcow2")."""

    __slots__ = ("cache", "decode", "encode", "name", "size", "storage")

    def __init__(
        self,
        cache: ClusterCache,
        storage: Storage,
        *,
        name: str,
        size: int,
        decode: Callable[[bytearray], Any],
        encode: Callable[[Any], bytes | bytearray | memoryview],
    ) -> None:
        self.cache = cache
        self.storage = storage
        self.name = name
        self.size = size
        self.decode = decode
        self.encode = encode

    def __repr__(self) -> str:
        return f"<TableKind {self.name} of {self.storage.name}>"


class CacheEntry:
    __slots__ = ("after", "dirty", "kind", "offset", "pins", "ready", "sync_before", "value")

    def __init__(self, kind: TableKind, offset: int) -> None:
        self.kind = kind
        self.offset = offset
        self.value: Any = None
        self.pins = 0
        self.dirty = False
        self.after: list[CacheEntry] = []
        self.sync_before = 0
        self.ready: asyncio.Future | None = None  # set while the first read is in flight


class ClusterCache:
    """See the module docstring.  ``budget`` is in bytes of table size."""

    def __init__(self, budget: int = DEFAULT_CACHE_SIZE) -> None:
        self.budget = budget
        self.used = 0
        self._entries: OrderedDict[tuple[TableKind, int], CacheEntry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.writebacks = 0
        self.peak = 0
        # The images' mapping memos (``Image.read``) share this limit on their entries,
        # about 4% of the budget at ~90 bytes per entry; the cache only keeps the count.
        self.memo_limit = max(4096, budget // 2048)
        self.memo_used = 0
        self.memo_owners: set[Any] = set()

    def kind(self, storage: Storage, **kw: Any) -> TableKind:
        return TableKind(self, storage, **kw)

    # -- lookup -----------------------------------------------------------------------------

    def peek(self, kind: TableKind, offset: int) -> CacheEntry | None:
        """A loaded entry, unpinned and valid until the caller's next await; else None."""
        e = self._entries.get((kind, offset))
        if e is None or e.ready is not None:
            return None
        self._entries.move_to_end((kind, offset))
        self.hits += 1
        return e

    async def get(self, kind: TableKind, offset: int) -> CacheEntry:
        """The table at ``offset``, read on a miss; returned pinned (call ``release``).

        A miss reads through ``kind.storage.read``.  When that completes at once (a local file)
        the entry is ready before anyone else runs; when it must wait (RBD, S3), the entry is
        entered with a ``ready`` future first, so concurrent misses on it wait for the one read
        (single flight) instead of reading again.
        """
        key = (kind, offset)
        e = self._entries.get(key)
        if e is not None:
            e.pins += 1
            if e.ready is not None:
                try:
                    await asyncio.shield(e.ready)
                except BaseException:
                    e.pins -= 1
                    raise
            else:
                self.hits += 1
            self._entries.move_to_end(key)
            return e
        self.misses += 1
        storage = kind.storage
        if offset + kind.size > storage.size:
            raise CorruptImage(storage.name, f"{kind.name} at 0x{offset:x} extends past end of file")
        e = CacheEntry(kind, offset)
        e.pins = 1
        raw = bytearray(kind.size)
        pending = storage.read(offset, memoryview(raw))
        if pending is None:
            e.value = kind.decode(raw)
        else:
            e.ready = asyncio.get_running_loop().create_future()
            self._entries[key] = e
            self.used += kind.size
            try:
                await pending
                e.value = kind.decode(raw)
            except BaseException as exc:
                del self._entries[key]
                self.used -= kind.size
                e.ready.set_exception(exc)
                e.ready.exception()  # mark retrieved: waiters re-raise it themselves
                e.ready = None
                raise
            ready, e.ready = e.ready, None
            ready.set_result(None)
            await self._make_room()
            return e
        self._entries[key] = e
        self.used += kind.size
        await self._make_room()
        return e

    def put_new(self, kind: TableKind, offset: int, value: Any) -> CacheEntry:
        """Insert a table that is new on disk (no read), pinned and dirty.  Replaces any stale copy."""
        key = (kind, offset)
        old = self._entries.pop(key, None)
        if old is not None:
            self.used -= kind.size
        e = CacheEntry(kind, offset)
        e.value = value
        e.pins = 1
        e.dirty = True
        self._entries[key] = e
        self.used += kind.size
        self.peak = max(self.peak, self.used)
        return e

    def release(self, entry: CacheEntry) -> None:
        assert entry.pins > 0, "release of an unpinned cache entry"
        entry.pins -= 1

    def mark_dirty(self, entry: CacheEntry, *, after: Iterable[CacheEntry] = (), sync_before: bool = False) -> None:
        entry.dirty = True
        for dep in after:
            if dep is not entry and dep not in entry.after:
                entry.after.append(dep)
        if sync_before:
            entry.sync_before += 1  # a generation: data written up to now must be synced first

    def invalidate(self, kind: TableKind, offset: int) -> None:
        """Forget a clean, unpinned table (its cluster was freed)."""
        e = self._entries.pop((kind, offset), None)
        if e is not None:
            assert not e.dirty and e.pins == 0, "invalidating a dirty or pinned entry"
            self.used -= kind.size

    # -- write-back -------------------------------------------------------------------------

    async def writeback(self, entries: Iterable[CacheEntry], _active: frozenset[int] = frozenset()) -> None:
        """Write the given dirty entries and, first, everything they depend on; then sync."""
        todo: list[CacheEntry] = []
        seen: set[int] = set()

        def visit(e: CacheEntry) -> None:
            if id(e) in seen:
                return
            seen.add(id(e))
            for d in e.after:
                if d.dirty:
                    visit(d)
            if e.dirty:
                todo.append(e)

        for e in entries:
            visit(e)
        await self._write_ordered(todo, _active)

    async def flush(self, storage: Storage) -> None:
        """Write back every dirty entry of ``storage`` in dependency order, then flush it."""
        todo = [e for e in self._entries.values() if e.dirty and e.kind.storage is storage]
        if todo:
            await self.writeback(todo)
        else:
            await storage.flush()

    async def _write_ordered(self, todo: list[CacheEntry], active: frozenset[int] = frozenset()) -> None:
        """``todo`` is in dependency order (dependencies first).  Syncs between layers.

        Every await (a sync) lets drivers dirty entries again, so the conditions for writing an
        entry (no dirty dependency, the syncs it needs done) are re-checked after each await and
        the write itself follows the last check with no await in between.  ``active``: entries
        being written by callers up the stack (a dependency cycle is not followed again).
        """
        stores: set[Storage] = set()
        written: set[int] = set()
        unsynced = False
        for e in todo:
            if id(e) in active:  # an outer call is writing it
                continue
            while e.dirty:
                pending = [d for d in e.after if d.dirty and id(d) not in active]
                if pending:  # dirtied (again) since the order was computed
                    await self.writeback(pending, active | {id(e)})
                    continue
                if unsynced and (e.sync_before or any(id(d) in written for d in e.after)):
                    for st in stores:
                        await st.flush()
                    unsynced = False
                    continue
                if e.sync_before:
                    gen = e.sync_before
                    await e.kind.storage.flush()
                    if e.sync_before == gen:  # no new copy-on-write data while we synced
                        e.sync_before = 0
                    continue
                # Clean from here: a change made while the write is in flight dirties it again.
                e.dirty = False
                after, e.after = e.after, []
                storage = e.kind.storage
                try:
                    pending = storage.write(e.offset, e.kind.encode(e.value))
                    if pending is not None:
                        await pending
                except BaseException:
                    e.dirty = True  # not known to be written: it is written again next time
                    e.after = after + e.after
                    raise
                self.writebacks += 1
                written.add(id(e))
                stores.add(storage)
                unsynced = True
        for st in stores:
            await st.flush()

    async def make_room(self) -> None:
        """Evict down to the budget; for callers that added tables with ``put_new`` (no miss)."""
        await self._make_room()

    async def _make_room(self) -> None:
        self.peak = max(self.peak, self.used)
        if self.used <= self.budget:
            return
        # Clean, unpinned entries first (no I/O), oldest first.
        for key in list(self._entries):
            if self.used <= self.budget:
                return
            e = self._entries[key]
            if e.pins == 0 and not e.dirty and e.ready is None:
                del self._entries[key]
                self.used -= e.kind.size
                self.evictions += 1
        # Then dirty unpinned entries: write back (with dependencies), then drop if still idle.
        victims = [e for e in self._entries.values() if e.pins == 0 and e.dirty]
        for e in victims:
            if self.used <= self.budget:
                return
            await self.writeback([e])
            key = (e.kind, e.offset)
            if self._entries.get(key) is e and e.pins == 0 and not e.dirty:
                del self._entries[key]
                self.used -= e.kind.size
                self.evictions += 1

    def discard_storage(self, storage: Storage) -> None:
        """Forget every entry of ``storage`` without writing (closed, read-only or failed open)."""
        for key in [k for k in self._entries if k[0].storage is storage]:
            e = self._entries.pop(key)
            self.used -= e.kind.size

    def stats(self) -> dict[str, int]:
        return {
            "budget": self.budget,
            "used": self.used,
            "peak": self.peak,
            "entries": len(self._entries),
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "writebacks": self.writebacks,
            "memo_entries": self.memo_used,
        }
