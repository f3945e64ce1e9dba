"""S3Storage against the cluster's radosgw: ranged reads equal the object at any offset, the cache
stays within its budget (by its own accounting and by tracemalloc), a replaced object fails reads
instead of mixing versions, errors are one line, and credentials appear in no log, error or repr.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserve.errors import ImageError
from nbdserve.storage.location import S3Location
from nbdserve.storage.s3 import S3Storage
from tests.ceph.conftest import BUCKET, MiB
from tests.cephcluster import S3_ACCESS_KEY, S3_SECRET_KEY
from tests.conftest import SLOW
from tests.imagetest import run
from tests.util import free_port

pytestmark = pytest.mark.ceph


async def read(stor: S3Storage, offset: int, n: int) -> bytearray:
    buf = bytearray(b"\xee" * n)
    pending = stor.read(offset, memoryview(buf))
    if pending is not None:
        await pending
    return buf


def run_now(coro):
    """Drive a coroutine that must finish (or raise) without waiting for anything."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the coroutine waited")


def expected(data: bytes, offset: int, n: int) -> bytes:
    part = data[offset : offset + n]
    return part + bytes(n - len(part))


ODD = random.Random(11).randbytes(5 * MiB + 123)  # the last chunk is short


@pytest.fixture(scope="module")
def odd_key(s3_client) -> str:
    s3_client.put_object(Bucket=BUCKET, Key="images/odd.img", Body=ODD)
    return "images/odd.img"


@settings(
    max_examples=40 if SLOW else 6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    reads=st.lists(
        st.lists(st.tuples(st.integers(0, 5 * MiB + 200), st.integers(1, 700_000)), min_size=1, max_size=6),
        min_size=1,
        max_size=5,
    )
)
def test_ranged_reads_equal_the_object(ceph, s3_env, odd_key, reads):
    """Batches of concurrent reads at unaligned offsets (some past the end) through a cache of
    four 256 KiB chunks: every byte equals the object's, zeroes past its end."""
    loc = S3Location(bucket=BUCKET, key=odd_key, endpoint=ceph.s3_endpoint, chunk=256 << 10, read_cache=1 * MiB)

    async def scenario():
        stor = await S3Storage.open(loc)
        try:
            for batch in reads:
                got = await asyncio.gather(*(read(stor, off, n) for off, n in batch))
                for (off, n), buf in zip(batch, got, strict=True):
                    assert buf == expected(ODD, off, n)
                assert stor.cached_bytes <= loc.read_cache
        finally:
            await stor.close()

    run(scenario())


def test_cached_reads_complete_synchronously_and_sequential_reads_prefetch(new_object):
    data = random.Random(5).randbytes(4 * MiB)
    loc = new_object(data, chunk=256 << 10, read_cache=2 * MiB)

    async def scenario():
        stor = await S3Storage.open(loc)
        try:
            buf = bytearray(1000)
            pending = stor.read(10, memoryview(buf))
            assert pending is not None  # a miss waits for a GET
            await pending
            assert stor.read(300, memoryview(buf)) is None  # a hit needs no loop turn
            assert buf == data[300:1300]
            gets = stor.gets
            await read(stor, 256 << 10, 256 << 10)  # the next chunk: sequential from here
            assert stor.gets > gets
            # Read-ahead is already under way for what follows.
            assert 2 in stor._fetching or 2 in stor._chunks
            for off in range(512 << 10, 4 * MiB, 64 << 10):
                assert await read(stor, off, 64 << 10) == data[off : off + (64 << 10)]
            assert stor.cached_bytes <= loc.read_cache
            for modify in (
                lambda: stor.write(0, b"x"),
                lambda: run_now(stor.discard(0, 4096)),
                lambda: run_now(stor.write_zeroes(0, 4096, may_unmap=True)),
                lambda: run_now(stor.truncate(0)),
            ):
                with pytest.raises(OSError) as e:
                    modify()
                assert e.value.errno == errno.EROFS
        finally:
            await stor.close()

    run(scenario())


def test_memory_stays_bounded_reading_an_object_six_times_the_cache(new_object):
    """24 MiB read sequentially and at random, 8 reads at a time, through a 4 MiB cache: the
    cache holds at most 4 MiB and the process never holds more than a few chunks more."""
    data = random.Random(9).randbytes(24 * MiB)
    loc = new_object(data, chunk=1 * MiB, read_cache=4 * MiB)
    del data  # the test must not hold the object either
    rng = random.Random(2)

    async def scenario():
        stor = await S3Storage.open(loc)
        try:
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            sem = asyncio.Semaphore(8)

            async def one(off: int) -> None:
                async with sem:
                    await read(stor, off, 300_000)
                    assert stor.cached_bytes <= loc.read_cache

            await asyncio.gather(*(one(off) for off in range(0, 24 * MiB, 300_000)))
            await asyncio.gather(*(one(rng.randrange(24 * MiB)) for _ in range(60)))
            peak = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.stop()
            return peak, stor.gets
        finally:
            await stor.close()

    peak, gets = run(scenario())
    assert gets >= 24  # it really went to the server for every chunk
    assert peak < 14 * MiB, f"peak {peak / MiB:.1f} MiB for a 4 MiB cache"


def test_replaced_object_fails_reads_instead_of_mixing_versions(new_object, s3_client):
    data = random.Random(1).randbytes(2 * MiB)
    loc = new_object(data, chunk=256 << 10, read_cache=1 * MiB)

    async def scenario():
        stor = await S3Storage.open(loc)
        try:
            assert await read(stor, 0, 1000) == data[:1000]
            s3_client.put_object(Bucket=BUCKET, Key=loc.key, Body=b"\x01" * (2 * MiB))
            assert await read(stor, 0, 1000) == data[:1000]  # cached: still the version opened
            with pytest.raises(OSError) as e:
                await read(stor, MiB, 1000)
            assert e.value.errno == errno.EIO
            assert "changed since it was opened" in str(e.value)
        finally:
            await stor.close()

    run(scenario())


def test_open_errors_are_one_line_and_keep_secrets(ceph, new_object, monkeypatch, caplog):
    """Every failure at open is one line naming the object; with debug logging on everywhere,
    neither the access key nor the secret appears in a log record, a message or a repr."""
    loc = new_object(b"golden" * 1000)  # uploaded by the test's own client, before logging starts
    caplog.set_level(logging.DEBUG)
    dead = f"http://127.0.0.1:{free_port()}"

    async def attempt(location: S3Location) -> str:
        with pytest.raises(ImageError) as e:
            await S3Storage.open(location)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(location.name)
        return msg

    async def scenario():
        stor = await S3Storage.open(loc)
        texts = [repr(stor), str(await read(stor, 0, 10))]
        await stor.close()
        texts.append(await attempt(S3Location(bucket=BUCKET, key="no/such.img", endpoint=loc.endpoint)))
        texts.append(await attempt(S3Location(bucket="no-such-bucket", key="x", endpoint=loc.endpoint)))
        texts.append(await attempt(S3Location(bucket=BUCKET, key=loc.key, endpoint=dead, timeout=2)))
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY[::-1])
        texts.append(await attempt(loc))
        return texts

    texts = run(scenario())
    assert "no such object" in texts[2]
    assert "no such bucket" in texts[3] or "no such object" in texts[3]
    assert "cannot connect" in texts[4]
    assert "access denied" in texts[5]
    everything = "\n".join([*texts, caplog.text, *(r.getMessage() for r in caplog.records)])
    assert S3_SECRET_KEY not in everything and S3_SECRET_KEY[::-1] not in everything
    assert S3_ACCESS_KEY not in everything


def test_credentials_from_a_profile_in_the_config_files(new_object, monkeypatch, tmp_path):
    loc = new_object(b"profiled" * 512)
    creds = tmp_path / "credentials"
    creds.write_text(f"[golden]\naws_access_key_id = {S3_ACCESS_KEY}\naws_secret_access_key = {S3_SECRET_KEY}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    async def scenario():
        stor = await S3Storage.open(S3Location(bucket=loc.bucket, key=loc.key, endpoint=loc.endpoint, profile="golden"))
        try:
            assert await read(stor, 8, 8) == b"profiled"
        finally:
            await stor.close()
        with pytest.raises(ImageError) as e:
            await S3Storage.open(S3Location(bucket=loc.bucket, key=loc.key, endpoint=loc.endpoint, profile="nope"))
        assert "\n" not in str(e.value)
        with pytest.raises(ImageError) as e:
            await S3Storage.open(loc)  # no profile, no environment: no credentials
        assert "no AWS credentials" in str(e.value)

    run(scenario())
