"""RbdStorage against a real cluster: bytes and allocation against a model and librbd's own
answer, exclusive locking between processes, lock take-over after a killed writer, and an OSD
killed mid-I/O (fail mode: EIO, wait mode: completion; nothing acknowledged lost either way).

Ground truth for allocation is ``diff_iterate(whole_object=True)`` on a separate connection (and
``rbd diff`` once, to have the command-line tool agree).  Offsets and lengths are unaligned.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserve.errors import ImageError
from nbdserve.server.buffers import ReplyBuffers
from nbdserve.storage.location import RbdLocation
from nbdserve.storage.rbd import RbdStorage
from tests.ceph.conftest import MiB, ground_truth_extents
from tests.conftest import SLOW
from tests.imagetest import run
from tests.util import REPO, TOOL_ENV

pytestmark = pytest.mark.ceph

OBJ = 4 * MiB  # the cluster's default object size


async def read_all(stor: RbdStorage, step: int = 8 * MiB) -> bytearray:
    buf = bytearray(stor.size)
    for pos in range(0, stor.size, step):
        pending = stor.read(pos, memoryview(buf)[pos : pos + step])
        if pending is not None:
            await pending
    return buf


async def our_map(stor: RbdStorage) -> list[tuple[int, int]]:
    """Data extents as RbdStorage reports them, merged."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < stor.size:
        n, data = await stor.extent(pos, stor.size - pos)
        assert 0 < n <= stor.size - pos
        if data:
            if out and out[-1][0] + out[-1][1] == pos:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((pos, n))
        pos += n
    return out


def holes_are_zero(extents: list[tuple[int, int]], model: bytes | bytearray) -> None:
    pos = 0
    for off, n in [*extents, (len(model), 0)]:
        assert not any(model[pos:off]), f"reported hole {pos}..{off} holds data"
        pos = off + n


OPS = st.lists(
    st.tuples(
        st.sampled_from(["write", "write", "discard", "zero", "zero-alloc", "flush"]),
        st.integers(0, 24 * MiB - 1),
        st.integers(1, 5 * MiB),
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=60 if SLOW else 8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS, seed=st.integers(0, 2**32 - 1))
def test_bytes_and_map_match_model_and_librbd(new_image, admin, ops, seed):
    """Random unaligned writes, discards and zeroes: every byte equals the model, the map equals
    librbd's object map, holes read as zero, and the map is fetched at most once per window."""
    loc = new_image(24 * MiB)
    rng = random.Random(seed)
    model = bytearray(24 * MiB)

    async def scenario():
        stor = await RbdStorage.open(loc, readonly=False)
        try:
            for kind, off, n in ops:
                n = min(n, stor.size - off)
                if kind == "write":
                    data = rng.randbytes(n)
                    pending = stor.write(off, data)
                    if pending is not None:
                        await pending
                    model[off : off + n] = data
                elif kind == "flush":
                    await stor.flush()
                else:
                    if kind == "discard":
                        assert await stor.discard(off, n)
                    else:
                        assert await stor.write_zeroes(off, n, may_unmap=kind == "zero")
                    model[off : off + n] = bytes(n)
                # A read straddling the range's edges, at an odd offset.
                lo, hi = max(0, off - 777), min(stor.size, off + n + 999)
                buf = bytearray(hi - lo)
                await stor.read(lo, memoryview(buf))
                assert buf == model[lo:hi]
            await stor.flush()
            assert await read_all(stor) == model
            ours = await our_map(stor)
            holes_are_zero(ours, model)
            assert ours == ground_truth_extents(admin, loc)
            assert stor.map.fetches <= 1
        finally:
            await stor.close()

    run(scenario())


def test_concurrent_writes_and_discards_keep_the_map_safe(new_image, admin):
    """Writes and discards in flight together (disjoint ranges, some in one object): the map
    never calls a hole what holds data, and once quiet it equals librbd's answer."""
    loc = new_image(32 * MiB)
    rng = random.Random(7)
    model = bytearray(32 * MiB)

    async def scenario():
        stor = await RbdStorage.open(loc, readonly=False)
        try:
            await stor.extent(0, stor.size)  # the map is loaded before the storm
            for _round in range(6):
                slots = rng.sample(range(32), 12)  # 1 MiB slots: several per 4 MiB object
                ops = []
                for s in slots:
                    off, n = s * MiB + rng.randrange(4096), rng.randrange(1, MiB - 4096)
                    if rng.random() < 0.5:
                        data = rng.randbytes(n)
                        model[off : off + n] = data
                        ops.append(stor.write(off, data))
                    else:
                        model[off : off + n] = bytes(n)
                        ops.append(stor.discard(off, n))
                    ops.append(stor.extent(rng.randrange(stor.size), MiB))
                await asyncio.gather(*ops)
                holes_are_zero(await our_map(stor), model)
            # Whole-object discards with nothing else in flight become holes without asking Ceph.
            fetches = stor.map.fetches
            await stor.discard(2 * OBJ, 2 * OBJ)
            model[2 * OBJ : 4 * OBJ] = bytes(2 * OBJ)
            assert await stor.extent(2 * OBJ, 3 * OBJ) == (2 * OBJ, False)
            assert stor.map.fetches == fetches
            assert await read_all(stor) == model
            holes_are_zero(await our_map(stor), model)
            # Anything left unknown is fetched again; then the map is librbd's.
            assert await our_map(stor) == ground_truth_extents(admin, loc)
        finally:
            await stor.close()

    run(scenario())


def test_map_first_loaded_while_writes_are_in_flight(new_image, admin):
    """The first allocation query after an open arrives while writes are in flight: the window
    is fetched then (the writes in flight are known to the map), every written range is data
    whatever the fetch saw, and once quiet the map is librbd's."""
    loc = new_image(32 * MiB)

    async def scenario():
        stor = await RbdStorage.open(loc, readonly=False)
        try:
            ranges = [(k * OBJ + 4097, MiB + 3) for k in range(0, 8, 2)]
            pending = [stor.write(off, os.urandom(n)) for off, n in ranges]
            assert stor.map.fetches == 0
            extents = await our_map(stor)  # loads the window with the writes still in flight
            assert stor.map.fetches == 1
            for off, n in ranges:
                assert any(a <= off and off + n <= a + m for a, m in extents), (off, n, extents)
            await asyncio.gather(*(p for p in pending if p is not None))
            assert await our_map(stor) == ground_truth_extents(admin, loc)
        finally:
            await stor.close()

    run(scenario())


def test_clone_map_follows_librbd_through_discards(admin, new_image):
    """In a clone, discarded objects are kept (zeroed) by librbd to hide the parent: the map marks
    what it cannot know UNKNOWN, fetches again, and ends equal to librbd's answer; bytes are the
    parent's where untouched."""
    import rbd

    parent = new_image(24 * MiB)
    rng = random.Random(4)
    model = bytearray(24 * MiB)
    with rbd.Image(admin[1], parent.image) as img:
        for off in (0, 5 * MiB, 13 * MiB):
            data = rng.randbytes(3 * MiB)
            img.write(data, off)
            model[off : off + len(data)] = data
        img.create_snap("base")
        img.protect_snap("base")
    child = RbdLocation(pool=parent.pool, image=parent.image + "-clone", conf=parent.conf)
    rbd.RBD().clone(admin[1], parent.image, "base", admin[1], child.image)

    async def scenario():
        stor = await RbdStorage.open(child, readonly=False)
        try:
            assert await our_map(stor) == ground_truth_extents(admin, child)
            for off, n in ((0, OBJ), (5 * MiB + 7, 2 * MiB), (20 * MiB, OBJ)):
                await stor.discard(off, n)
                model[off : off + n] = bytes(n)
            await stor.write(21 * MiB + 3, b"child")
            model[21 * MiB + 3 : 21 * MiB + 8] = b"child"
            assert await read_all(stor) == model
            ours = await our_map(stor)
            holes_are_zero(ours, model)
            assert ours == ground_truth_extents(admin, child)
        finally:
            await stor.close()

    run(scenario())


def test_reads_never_ask_for_allocation_and_cli_agrees(ceph, new_image):
    loc = new_image(64 * MiB)

    async def scenario():
        stor = await RbdStorage.open(loc, readonly=False)
        try:
            for off in (5, 9 * MiB + 3, 41 * MiB - 2):
                await stor.write(off, b"\x5a" * 70000)
            buf = memoryview(bytearray(4096))
            for i in range(200):
                await stor.read(i * 300_001 % (stor.size - 4096), buf)
            assert stor.map.fetches == 0  # reads alone never fetch
            for i in range(50):
                await stor.extent(i * 1_234_567 % stor.size, MiB)
            assert stor.map.fetches == 1  # one window covers the image
            await stor.flush()
            return await our_map(stor)
        finally:
            await stor.close()

    ours = run(scenario())
    diff = json.loads(ceph.rbd("diff", "--whole-object", "--format", "json", f"{loc.pool}/{loc.image}"))
    cli = [(d["offset"], d["length"]) for d in diff if d["exists"] == "true" or d["exists"] is True]
    merged: list[tuple[int, int]] = []
    for off, n in cli:
        if merged and sum(merged[-1]) == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((off, n))
    assert ours == merged == [(0, OBJ), (2 * OBJ, OBJ), (10 * OBJ, OBJ)]


def test_growth_short_tail_and_truncate(admin, new_image):
    """Reads past the end are zeroes; writes past it grow the image (librbd agrees on the
    size); truncate shrinks and grows, and the grown part reads as zeroes and as a hole."""
    import rbd

    loc = new_image(10 * MiB + 5)

    async def scenario():
        stor = await RbdStorage.open(loc, readonly=False)
        try:
            buf = bytearray(b"\xff" * 100)
            pending = stor.read(stor.size - 10, memoryview(buf))
            if pending is not None:
                await pending
            assert buf == bytes(100)
            await stor.write(stor.size + 3, b"tail")
            assert stor.size == 10 * MiB + 12
            await stor.truncate(3 * MiB + 1)
            await stor.truncate(9 * MiB)
            assert await stor.extent(3 * MiB + 1, 6 * MiB) == (6 * MiB - 1, False)
            got = bytearray(9 * MiB)
            await stor.read(0, memoryview(got))
            assert got == bytes(9 * MiB)
            return stor.size
        finally:
            await stor.close()

    size = run(scenario())
    with rbd.Image(admin[1], loc.image, read_only=True) as img:
        assert img.size() == size == 9 * MiB


def test_a_cancelled_read_keeps_its_buffer_from_reuse_until_librbd_is_done(new_image):
    """A caller that gives up on a read drops its buffer; librbd still fills it, so the backend
    holds it until the completion arrives: the server's reply pool does not hand it out again
    before that, and does after."""
    loc = new_image(8 * MiB)
    pool = ReplyBuffers(min_size=1)

    async def scenario():
        stor = await RbdStorage.open(loc, readonly=False)
        try:
            await stor.write(0, b"\x11" * 65536)
            buf = pool.get(65536)
            buf_id = id(buf)
            stor.read(0, memoryview(buf)).cancel()  # before the loop can deliver anything
            del buf
            assert id(pool.get(65536)) != buf_id  # librbd may still write it
            for _ in range(10):  # later reads of the same object: the first one's answer arrives meanwhile
                other = bytearray(65536)
                await stor.read(0, memoryview(other))
                assert other == b"\x11" * 65536
            assert id(pool.get(65536)) == buf_id  # done: reusable
        finally:
            await stor.close()

    run(scenario())


# -- locking ------------------------------------------------------------------------------------

HOLDER = """
import asyncio, sys
from nbdserve.storage.location import RbdLocation
from nbdserve.storage.rbd import RbdStorage

async def main():
    pool, image, conf = sys.argv[1:4]
    stor = await RbdStorage.open(RbdLocation(pool=pool, image=image, conf=conf), readonly=False)
    await stor.write(0, b"holder")
    await stor.flush()
    print("locked", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await stor.close()
    print("released", flush=True)

asyncio.run(main())
"""


def start_holder(loc: RbdLocation) -> subprocess.Popen:
    """Another process that holds ``loc``'s exclusive lock; returns once it does."""
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, loc.pool, loc.image, loc.conf or ""],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=TOOL_ENV,
    )
    line = p.stdout.readline()
    if line.strip() != "locked":
        p.kill()
        raise AssertionError(f"holder did not take the lock: {line!r} {p.communicate()[1]}")
    return p


def test_second_writer_refused_readers_and_snapshots_served(admin, new_image):
    import rbd

    loc = new_image(8 * MiB)
    with rbd.Image(admin[1], loc.image) as img:
        img.write(b"before", 0)
        img.create_snap("s1")
    holder = start_holder(loc)
    try:

        async def scenario():
            with pytest.raises(ImageError) as e:
                await RbdStorage.open(loc, readonly=False)
            msg = str(e.value)
            assert "locked by another writer" in msg and "\n" not in msg and msg.startswith(loc.name)
            snap = RbdLocation(pool=loc.pool, image=loc.image, snap="s1", conf=loc.conf)
            readers = [await RbdStorage.open(loc, readonly=True) for _ in range(2)]
            readers += [await RbdStorage.open(snap, readonly=False) for _ in range(2)]  # @snap: read-only
            try:
                got = []
                for r in readers:
                    buf = bytearray(6)
                    await r.read(0, memoryview(buf))
                    got.append(bytes(buf))
                    assert r.readonly
                    with pytest.raises(OSError) as w:
                        r.write(0, b"x")
                    assert w.value.errno == errno.EROFS
                assert got == [b"holder", b"holder", b"before", b"before"]
            finally:
                for r in readers:
                    await r.close()

        run(scenario())
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        assert holder.wait(30) == 0
        # Released cleanly: the next writer gets the lock at once.
        run(_open_write_close(loc, b"next"))
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


async def _open_write_close(loc: RbdLocation, data: bytes) -> None:
    stor = await RbdStorage.open(loc, readonly=False)
    try:
        await stor.write(0, data)
        await stor.flush()
    finally:
        await stor.close()


def test_killed_writer_lock_taken_over_and_blocklisted(ceph, admin, new_image):
    """SIGKILL the holder: the next writer waits until the cluster expires the dead client's
    watch (``osd client watch timeout``, 5 s in the test cluster), breaks the lock and
    blocklists the dead client, so it could never write again."""
    import rbd

    loc = new_image(8 * MiB)
    holder = start_holder(loc)
    with rbd.Image(admin[1], loc.image, read_only=True) as img:
        owners = [addr for _client, _cookie, addr in img.list_lockers()["lockers"]]
    assert len(owners) == 1
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    run(_open_write_close(loc, b"taken over"))
    # Pacific prints two JSON lists (addresses, then address ranges): the first is ours.
    blocklist, _ = json.JSONDecoder().raw_decode(ceph.ceph("osd", "blocklist", "ls", "--format", "json").strip())
    assert owners[0] in {e["addr"] for e in blocklist}
    with rbd.Image(admin[1], loc.image, read_only=True) as img:
        assert img.read(0, 10) == b"taken over"


def test_blocklisted_writer_fails_with_eio(ceph, admin, new_image):
    """A writer the cluster has blocklisted (what a take-over does to a holder it presumed dead)
    gets EIO with the reason, never a silent write."""
    import rbd

    loc = new_image(8 * MiB, timeout=5)

    async def scenario():
        stor = await RbdStorage.open(loc, readonly=False)
        try:
            await stor.write(0, b"mine")
            await stor.flush()
            with rbd.Image(admin[1], loc.image, read_only=True) as img:
                (addr,) = [a for _client, _cookie, a in img.list_lockers()["lockers"]]
            ceph.ceph("osd", "blocklist", "add", addr)
            with pytest.raises(OSError) as e:
                await stor.write(4096, b"too late")
                await stor.flush()
            assert e.value.errno == errno.EIO and "blocklisted" in str(e.value)
        finally:
            await stor.close()
        return addr

    addr = run(scenario())
    ceph.ceph("osd", "blocklist", "rm", addr)
    with rbd.Image(admin[1], loc.image, read_only=True) as img:
        assert img.read(0, 4) == b"mine" and img.read(4096, 8) == bytes(8)


def test_open_errors_are_one_line(ceph, new_image):
    loc = new_image(MiB)

    async def attempt(**kw):
        with pytest.raises(ImageError) as e:
            await RbdStorage.open(
                RbdLocation(**{"pool": loc.pool, "image": loc.image, "conf": loc.conf, **kw}), readonly=True
            )
        assert "\n" not in str(e.value)
        return str(e.value)

    async def scenario():
        return [
            await attempt(image="nosuch"),
            await attempt(snap="nosuch"),
            await attempt(pool="nosuchpool"),
            await attempt(conf=os.devnull + "x"),
        ]

    msgs = run(scenario())
    assert "no image 'nosuch'" in msgs[0]
    assert "no snapshot 'nosuch'" in msgs[1]
    assert "no pool 'nosuchpool'" in msgs[2]
    assert "cannot read a Ceph config" in msgs[3]


# -- outages ------------------------------------------------------------------------------------


async def released(pool: ReplyBuffers, size: int, buf_id: int, timeout: float = 60) -> None:
    """Wait until ``pool`` hands out the buffer ``buf_id`` again (nothing else refers to it)."""
    deadline = time.monotonic() + timeout
    while id(pool.get(size)) != buf_id:
        assert time.monotonic() < deadline, "the failed read's buffer was never released"
        await asyncio.sleep(0.05)


def test_osd_killed_mid_io_fail_mode(ceph, new_image):
    """on-outage=fail: requests the dead OSD cannot answer fail with EIO after the timeout, a
    failed read's buffer is not reused until librbd has filled it, and once the OSD is back the same open storage
    works again with every acknowledged write intact (failed writes: old or new bytes)."""
    loc = new_image(16 * MiB, timeout=1.5, on_outage="fail")
    rng = random.Random(3)
    model = bytearray(rng.randbytes(16 * MiB))
    failed: list[tuple[int, bytes]] = []

    async def scenario():
        stor = await RbdStorage.open(loc, readonly=False)
        try:
            await stor.write(0, model)
            await stor.flush()
            # A burst in flight, then the OSD dies under it, then more requests.
            writes = []
            for i in range(8):
                off, data = i * 2 * MiB + rng.randrange(1000), rng.randbytes(rng.randrange(1, 300_000))
                writes.append((off, data, stor.write(off, data)))
            ceph.stop_osd()
            for i in range(8):
                off, data = i * 2 * MiB + MiB + rng.randrange(1000), rng.randbytes(rng.randrange(1, 300_000))
                writes.append((off, data, stor.write(off, data)))
            pool = ReplyBuffers(min_size=1)
            sentinel = pool.get(65536)
            sentinel_id = id(sentinel)
            read = stor.read(5 * MiB + 3, memoryview(sentinel))
            del sentinel  # as the server drops the buffer of a failed read
            results = await asyncio.gather(*(p for _, _, p in writes), read, stor.flush(), return_exceptions=True)
            for (off, data, _), r in zip(writes, results, strict=False):
                if r is None:
                    model[off : off + len(data)] = data
                else:
                    assert isinstance(r, OSError) and r.errno == errno.EIO, r
                    failed.append((off, data))
            read_result, flush_result = results[-2:]
            assert isinstance(read_result, OSError) and read_result.errno == errno.EIO
            assert isinstance(flush_result, OSError) and flush_result.errno == errno.EIO
            assert id(pool.get(65536)) != sentinel_id  # librbd may still fill the failed read's buffer
            ceph.start_osd()
            ceph.wait_osd_up()
            await stor.flush()  # the same storage, no reopen
            got = await read_all(stor)
            await released(pool, 65536, sentinel_id)  # librbd finishes the read, then it is free
            return got
        finally:
            await stor.close()

    got = run(scenario())
    for off, data in failed:  # a failed write may have landed, or not
        if got[off : off + len(data)] == data:
            model[off : off + len(data)] = data
    assert got == model


def test_a_close_given_up_on_keeps_read_memory_until_librbd_returns(ceph, new_image):
    """The OSD is down with a read in flight: the read fails by timeout, and so does close
    (librbd waits for the read).  The read's buffer is still not reused while librbd's close
    runs, and is once the OSD is back and that close returns."""
    loc = new_image(8 * MiB, timeout=1.0, on_outage="fail")
    pool = ReplyBuffers(min_size=1)

    async def scenario():
        stor = await RbdStorage.open(loc, readonly=False)
        await stor.write(0, b"\x22" * (2 * MiB))
        await stor.flush()
        ceph.stop_osd()
        try:
            buf = pool.get(65536)
            buf_id = id(buf)
            read = stor.read(MiB, memoryview(buf))
            del buf  # as the server drops the buffer of a failed read
            with pytest.raises(OSError) as failed:
                await read
            assert failed.value.errno == errno.EIO
            await stor.close()  # gives up on librbd's close after the timeout
            assert id(pool.get(65536)) != buf_id
        finally:
            ceph.start_osd()
            ceph.wait_osd_up()
        await released(pool, 65536, buf_id)  # librbd's close returns, then the buffer is free

    run(scenario())


def test_osd_killed_wait_mode_requests_complete_after_restart(ceph, new_image):
    loc = new_image(8 * MiB, timeout=1, on_outage="wait")

    async def scenario():
        stor = await RbdStorage.open(loc, readonly=False)
        try:
            await stor.write(0, b"A" * 8192)
            await stor.flush()
            ceph.stop_osd()
            write = asyncio.ensure_future(stor.write(4096, b"B" * 8192))
            buf = bytearray(16384)
            read = asyncio.ensure_future(stor.read(0, memoryview(buf)))
            flush = asyncio.ensure_future(stor.flush())
            # Longer than the timeout: nothing failed, the read is still waiting.
            await asyncio.wait([read], timeout=2.5)
            assert not read.done() and not flush.done()
            ceph.start_osd()
            await asyncio.gather(write, read, flush)
            assert buf[:4096] == b"A" * 4096 and buf[12288:] == bytes(4096)
            assert buf[4096:12288] in (b"A" * 4096 + bytes(4096), b"B" * 8192)  # read raced the write
            after = bytearray(16384)
            await stor.read(0, memoryview(after))
            assert after == b"A" * 4096 + b"B" * 8192 + bytes(4096)
        finally:
            await stor.close()

    run(scenario())
