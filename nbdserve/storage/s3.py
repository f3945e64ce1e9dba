"""Read-only images in S3-compatible object storage: the ``s3://`` backend of the storage contract.

Owns ``S3Storage``: one object (a golden image) read with ranged GETs of ``chunk`` bytes,
aligned to the chunk size, through a bounded LRU cache in memory.  Writes are refused (an
export that needs to write puts a local overlay on top, in the image layer).

Client library: botocore, the engine under boto3 and the AWS CLI.  It resolves credentials the
way every AWS tool does (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``AWS_PROFILE``, ``~/.aws/credentials`` and ``~/.aws/config``, SSO, instance roles), signs with
SigV4, retries and speaks to any S3-compatible endpoint (Ceph RGW, MinIO).  Each request costs
it about a millisecond of Python, so requests are large: a chunk (8 MiB by default) per GET,
several at once on a small thread pool, with read-ahead when reads are sequential.

Reads: ``read`` copies the cached chunks it needs into the caller's buffer and returns ``None``
when all were cached (no loop turn); otherwise it starts the missing fetches (one per chunk,
shared by concurrent readers) and returns an awaitable.  GETs run on the pool, never on the
loop.  Every GET carries ``If-Match`` with the ETag seen at open, so an object replaced while
served fails reads with EIO instead of mixing two versions.

Invariants:
  * cached bytes + bytes reserved by GETs in flight <= ``read_cache`` (the LRU evicts first); at most
    ``min(threads, read_cache/chunk - 1)`` GETs run at once, each holding a slot and a reservation,
    so memory stays bounded however many reads wait;
  * a chunk is cached only whole (its full length, or up to the end of the object);
  * credentials never reach a log line, an error message or a repr: errors are built from
    the S3 error code and HTTP status only, and botocore's own debug logging (which prints
    request headers) is held at WARNING unless configured explicitly.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import logging
from typing import Any

from ..errors import ImageError
from .base import Buffer, Pending, Storage
from .location import S3Location

log = logging.getLogger(__name__)


def _botocore() -> Any:
    try:
        import botocore.config
        import botocore.exceptions
        import botocore.session
    except ImportError:
        raise ImportError("s3:// exports need botocore (pip install botocore, or Debian python3-botocore)") from None
    return botocore


def _quiet_third_party_logs() -> None:
    """botocore logs request headers (access key id, signature) at DEBUG: keep it at WARNING
    unless someone configured its logger on purpose."""
    for name in ("botocore", "urllib3"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def describe_error(e: BaseException) -> str:
    """One line, without anything secret: the S3 error code and HTTP status, or the exception kind."""
    bc = _botocore()
    if isinstance(e, bc.exceptions.ClientError):
        err = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        code = err.get("Code", "error")
        if code in ("PreconditionFailed", "412"):
            return "the object changed since it was opened (ETag mismatch)"
        if code in ("NoSuchKey", "404", "NotFound"):
            return "no such object"
        if code in ("NoSuchBucket",):
            return "no such bucket"
        if code in ("AccessDenied", "403", "Forbidden", "SignatureDoesNotMatch", "InvalidAccessKeyId"):
            return f"access denied ({code}, HTTP {status})"
        return f"S3 error {code} (HTTP {status})"
    if isinstance(e, bc.exceptions.NoCredentialsError):
        return "no AWS credentials found (environment, AWS_PROFILE or ~/.aws)"
    if isinstance(e, bc.exceptions.EndpointConnectionError):
        return "cannot connect to the S3 endpoint"
    if isinstance(e, bc.exceptions.ConnectTimeoutError | bc.exceptions.ReadTimeoutError):
        return "the S3 endpoint did not answer in time"
    if isinstance(e, bc.exceptions.BotoCoreError):
        return f"S3 client error ({type(e).__name__})"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return type(e).__name__


class S3Storage(Storage):
    """A read-only S3 object; see the module docstring.  Open with ``open()``."""

    sync_io = False
    readonly = True

    def __init__(self, loc: S3Location, client: Any, size: int, etag: str) -> None:
        self.loc = loc
        self.name = loc.name
        self.size = size
        self._client = client
        self._etag = etag
        self._chunk = loc.chunk
        self._budget = loc.read_cache
        self._loop = asyncio.get_running_loop()
        # At most this many GETs at once, so reservations always fit next to one cached chunk.
        self._max_fetches = max(1, min(loc.threads, loc.read_cache // loc.chunk - 1))
        self._pool = concurrent.futures.ThreadPoolExecutor(self._max_fetches, thread_name_prefix="s3-get")
        self._slots = asyncio.Semaphore(self._max_fetches)  # a GET holds one, with its reservation
        self._chunks: collections.OrderedDict[int, bytes] = collections.OrderedDict()  # LRU: oldest first
        self._cached = 0  # bytes in _chunks
        self._reserved = 0  # bytes reserved by fetches in flight
        self._fetching: dict[int, asyncio.Future] = {}
        self._next_sequential = -1  # the chunk a sequential reader would want next
        self._closed = False
        self.gets = 0  # GET requests made (for tests and statistics)

    def __repr__(self) -> str:
        return f"<S3Storage {self.name} size={self.size}>"

    @classmethod
    async def open(cls, loc: S3Location, *, readonly: bool = True) -> S3Storage:
        """HEAD the object (size, ETag); ``ImageError`` with one line if that fails."""
        try:
            _botocore()
        except ImportError as e:
            raise ImageError(loc.name, str(e)) from None
        _quiet_third_party_logs()
        loop = asyncio.get_running_loop()
        try:
            client = await loop.run_in_executor(None, _client, loc)  # local work: no deadline
            size, etag = await asyncio.wait_for(loop.run_in_executor(None, _head, client, loc), 3 * loc.timeout)
        except TimeoutError:
            raise ImageError(loc.name, f"no answer from the S3 endpoint in {3 * loc.timeout:g} s") from None
        except Exception as e:
            raise ImageError(loc.name, describe_error(e)) from None
        return cls(loc, client, size, etag)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._chunks.clear()
        self._cached = 0
        close = getattr(self._client, "close", None)
        if close is not None:
            await self._loop.run_in_executor(None, close)

    # -- the contract ------------------------------------------------------------------------

    def read(self, offset: int, buf: memoryview) -> Pending:
        n = len(buf)
        end = min(offset + n, self.size)
        if end < offset + n:
            start = max(end, offset) - offset
            buf[start:] = bytes(n - start)
        if offset >= end:
            return None
        c = self._chunk
        first, last = offset // c, (end - 1) // c
        missing = []
        for i in range(first, last + 1):
            data = self._chunks.get(i)
            if data is None:
                missing.append(i)
            else:
                self._chunks.move_to_end(i)
                _copy(buf, offset, data, i * c, end)
        sequential = first in (self._next_sequential, self._next_sequential - 1)
        self._next_sequential = last + 1
        if missing:
            futs = [(i, self._fetch(i)) for i in missing]
            if sequential:
                self._read_ahead(last + 1)
            return self._wait_missing(offset, end, buf, futs)
        if sequential:
            self._read_ahead(last + 1)
        return None

    def write(self, offset: int, data: Buffer | list[Buffer]) -> Pending:
        raise self._readonly()

    async def flush(self) -> None:
        return None

    async def discard(self, offset: int, length: int) -> bool:
        raise self._readonly()

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> bool:
        raise self._readonly()

    async def truncate(self, size: int) -> None:
        raise self._readonly()

    def _readonly(self) -> OSError:
        return OSError(errno.EROFS, f"{self.name}: S3 objects are served read-only")

    # -- cache ---------------------------------------------------------------------------------

    @property
    def cached_bytes(self) -> int:
        """Bytes held by the cache (and reserved for fetches in flight)."""
        return self._cached + self._reserved

    async def _wait_missing(
        self, offset: int, end: int, buf: memoryview, futs: list[tuple[int, asyncio.Future]]
    ) -> None:
        for i, fut in futs:
            data = await asyncio.shield(fut)
            _copy(buf, offset, data, i * self._chunk, end)

    def _read_ahead(self, start: int) -> None:
        """Fetch the chunks after a sequential read while GET slots are free (never waits)."""
        stop = min(start + self._max_fetches, -(-self.size // self._chunk))
        for i in range(start, stop):
            if self._slots.locked():
                return
            if i not in self._chunks and i not in self._fetching:
                self._fetch(i)

    def _fetch(self, i: int) -> asyncio.Future:
        """The (shared) fetch of chunk ``i``; its result is the chunk's bytes."""
        fut = self._fetching.get(i)
        if fut is None:
            if self._closed:
                raise OSError(errno.ESHUTDOWN, f"{self.name}: closed")
            fut = self._fetching[i] = asyncio.ensure_future(self._fetch_chunk(i))
            fut.add_done_callback(_retrieve)
        return fut

    async def _fetch_chunk(self, i: int) -> bytes:
        """One GET slot, room in the budget, the GET on the pool, then into the cache."""
        c = self._chunk
        length = min(c, self.size - i * c)
        try:
            async with self._slots:
                self._make_room(length)
                self._reserved += length
                try:
                    data = await self._loop.run_in_executor(self._pool, self._get, i * c, length)
                finally:
                    self._reserved -= length
            if not self._closed:
                self._make_room(length)
                self._chunks[i] = data
                self._cached += length
            return data
        finally:
            del self._fetching[i]

    def _make_room(self, need: int) -> None:
        while self._chunks and self._cached + self._reserved + need > self._budget:
            _, data = self._chunks.popitem(last=False)
            self._cached -= len(data)

    def _get(self, start: int, length: int) -> bytes:
        """Pool thread: one ranged GET.  Raises OSError(EIO) with a one-line reason."""
        try:
            resp = self._client.get_object(
                Bucket=self.loc.bucket,
                Key=self.loc.key,
                Range=f"bytes={start}-{start + length - 1}",
                IfMatch=self._etag,
            )
            data = resp["Body"].read()
        except Exception as e:
            raise OSError(errno.EIO, f"{self.name}: read at {start}: {describe_error(e)}") from None
        self.gets += 1
        if len(data) != length:
            raise OSError(errno.EIO, f"{self.name}: read at {start}: got {len(data)} bytes of {length}")
        return data


def _retrieve(fut: asyncio.Future) -> None:
    """Mark a fetch's exception as seen (read-ahead fetches may have no reader)."""
    if not fut.cancelled():
        fut.exception()


def _copy(buf: memoryview, offset: int, data: bytes, data_offset: int, end: int) -> None:
    """Copy the part of ``data`` (which starts at ``data_offset`` in the object) that falls in
    ``[offset, end)`` into ``buf`` (which starts at ``offset``)."""
    lo = max(offset, data_offset)
    hi = min(end, data_offset + len(data))
    if lo < hi:
        buf[lo - offset : hi - offset] = memoryview(data)[lo - data_offset : hi - data_offset]


def _client(loc: S3Location) -> Any:
    """Blocking (executor): make the client (reads botocore's service model and the AWS config
    files; no network, so the open deadline does not cover it: on a loaded host it can take
    seconds)."""
    bc = _botocore()
    session = bc.session.Session(profile=loc.profile)
    options: dict[str, Any] = {
        "connect_timeout": loc.timeout,
        "read_timeout": loc.timeout,
        "retries": {"max_attempts": 3, "mode": "standard"},
        "max_pool_connections": loc.threads,
    }
    if loc.endpoint:
        options["s3"] = {"addressing_style": "path"}
    region = loc.region or session.get_config_variable("region") or "us-east-1"
    return session.create_client(
        "s3", region_name=region, endpoint_url=loc.endpoint, config=bc.config.Config(**options)
    )


def _head(client: Any, loc: S3Location) -> tuple[int, str]:
    """Blocking (executor): HEAD the object: (size, ETag)."""
    head = client.head_object(Bucket=loc.bucket, Key=loc.key)
    return int(head["ContentLength"]), head["ETag"]
