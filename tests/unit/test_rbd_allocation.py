"""The RBD allocation map (``storage.rbd.AllocationMap``) against a model of what the image may
hold, without a cluster: the map's fetch and its view of the writes in flight are given by the
test, so every interleaving of our own writes, discards, fetches and Ceph's answers can be
produced.  (The map against a real cluster's object map is in tests/ceph.)

The model assumes nothing about the order in which Ceph applies overlapping requests that are in
flight together: a granule may hold data once a write to it was submitted, and stops only when a
discard over it completes with no write to it in flight or submitted since the discard began.
Ceph's answer to a fetch holds at least the granules whose writes had completed, and no discard
undone, when the fetch began (writes in flight then may or may not be in it).  The invariant:
the map never says HOLE for a granule that may hold data, and ``extent`` never reports such a
granule as a hole.
"""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from nbdserve.storage.rbd import HOLE, AllocationMap

G = 4096  # granule (object) size
N = 12  # granules in the image

OPS = st.lists(
    st.tuples(
        st.sampled_from(["write", "write_done", "query", "answer", "zero", "zero_done"]),
        st.integers(0, N - 1),
        st.integers(1, 4),
        st.frozensets(st.integers(0, N - 1), max_size=N),
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(OPS, st.booleans())
def test_the_map_never_reports_a_hole_where_data_may_be(ops, exact_zero):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        writes: dict[int, tuple[int, int]] = {}  # in flight: id -> (first, stop) granules
        zeroes: dict[int, tuple[int, int, int | None, set[int]]] = {}  # in flight: id -> (first, stop, token, touched)
        holding: set[int] = set()  # granules whose completed writes no discard has undone
        fetches: list[tuple[asyncio.Future, set[int]]] = []

        def may_hold() -> set[int]:
            out = set(holding)
            for first, stop in writes.values():
                out.update(range(first, stop))
            return out

        def fetch(offset: int, length: int) -> asyncio.Future:
            fut = loop.create_future()
            fetches.append((fut, set(holding)))  # writes still in flight may be missing from it
            return fut

        def in_flight() -> list[tuple[int, int]]:
            return [(first * G, (stop - first) * G) for first, stop in writes.values()]

        m = AllocationMap(N * G, G, enabled=True, exact_zero=exact_zero, fetch=fetch, writes_in_flight=in_flight)
        queries: list[tuple[asyncio.Task, int]] = []
        for n, (kind, first, count, extra) in enumerate(ops):
            stop = min(N, first + count)
            if kind == "write":
                writes[n] = (first, stop)
                for _, _, _, touched in zeroes.values():
                    touched.update(range(first, stop))
                m.note_write(first * G, (stop - first) * G)
            elif kind == "write_done" and writes:
                w = min(writes)
                holding.update(range(*writes.pop(w)))
            elif kind == "query":
                queries.append((asyncio.ensure_future(m.extent(first * G, (stop - first) * G)), first))
            elif kind == "answer" and fetches:
                fut, known = fetches.pop(0)
                answer = sorted(known | extra)
                fut.set_result([(g * G, G) for g in answer])
            elif kind == "zero":
                touched = {g for a, b in writes.values() for g in range(a, b)}
                zeroes[n] = (first, stop, m.zero_started(first * G, (stop - first) * G), touched)
            elif kind == "zero_done" and zeroes:
                z = min(zeroes)
                a, b, token, touched = zeroes.pop(z)
                holding.difference_update(set(range(a, b)) - touched)
                m.note_zeroed(a * G, (b - a) * G, token)
            await asyncio.sleep(0)  # let queries run up to their fetch, or finish
            bad = [g for g in may_hold() if m.state[g] == HOLE]
            assert not bad, f"after op {n} ({kind}): granules {bad} may hold data but the map says HOLE"
            for task, at in [q for q in queries if q[0].done()]:
                length, data = task.result()
                assert data or not may_hold() & set(range(at, at + -(-length // G))), (n, at, length)
                queries.remove((task, at))
        for fut, known in fetches:
            fut.set_result([(g * G, G) for g in sorted(known)])
        await asyncio.sleep(0)

    asyncio.run(main())
