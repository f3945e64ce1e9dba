"""``server.landing.Splicer``: a payload moved from a real socket into a real file by splice(2).

Each test runs on asyncio's loop and on uvloop.  A thread sends the payload in pieces of random
size over a Unix socket pair, so the reader wakes many times with partial data; the bytes after
the payload (the next request, as far as the splicer knows) must stay in the socket, untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import socket
import struct
import termios
import threading

import pytest

from nbdserve.server.landing import GRAIN, Splicer

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a test dependency
    uvloop = None

LOOPS = ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(uvloop is None, reason="no uvloop"))]
NEXT = b"the next request's header"


def run(kind: str, main):
    if kind == "uvloop":
        return uvloop.run(main())
    return asyncio.run(main())


def send_in_pieces(sock: socket.socket, data: bytes, seed: int) -> threading.Thread:
    rng = random.Random(seed)

    def send() -> None:
        pos = 0
        while pos < len(data):
            n = rng.choice([1, 17, 4096, 65536, 300_000])
            sock.sendall(data[pos : pos + n])
            pos += n

    t = threading.Thread(target=send)
    t.start()
    return t


async def land(sock: socket.socket, dest: int, offset: int, prefix: bytes, left: int) -> BaseException | None:
    """Run one landing to its end; its ``done`` argument."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future = loop.create_future()
    splicer = Splicer(loop, sock.fileno())
    try:
        splicer.start(dest, offset, memoryview(prefix), left, finished.set_result)
        assert splicer.busy
        return await asyncio.wait_for(finished, 60)
    finally:
        splicer.close()


@contextlib.contextmanager
def wired(path, content: bytes, flags: int = os.O_RDWR):
    """(receiving socket, sending socket, descriptor of ``path`` holding ``content``)."""
    path.write_bytes(content)
    a, b = socket.socketpair()
    a.setblocking(False)
    fd = os.open(path, flags)
    try:
        yield a, b, fd
    finally:
        os.close(fd)
        a.close()
        b.close()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("offset", [0, 1, 4095, 1 << 20])
def test_payload_lands_at_its_offset_and_nothing_after_it_is_taken(tmp_path, loop, offset):
    size, prefix_len = (3 << 20) + 7, 12345  # more than one pipe's worth
    payload = random.Random(offset).randbytes(size)
    old = random.Random(-1).randbytes(8 << 20)
    with wired(tmp_path / "image", old) as (a, b, fd):

        async def main():
            sender = send_in_pieces(b, payload[prefix_len:] + NEXT, offset)
            result = await land(a, fd, offset, payload[:prefix_len], size - prefix_len)
            sender.join()
            return result

        assert run(loop, main) is None
        want = bytearray(old)
        want[offset : offset + size] = payload
        assert (tmp_path / "image").read_bytes() == want
        a.setblocking(True)
        assert a.recv(100) == NEXT


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("prefix_len", [0, 1000, 3 * GRAIN + 5])
def test_file_error_still_takes_exactly_the_payload_off_the_socket(tmp_path, loop, prefix_len):
    """splice(2) refuses a file opened for appending (EINVAL), after the prefix's whole grains went
    in: the rest of the payload is read and dropped, ``done`` gets the error, the next bytes stay."""
    size = (2 << 20) + 3
    payload = random.Random(2).randbytes(size)
    path = tmp_path / "appending"
    with wired(path, b"", os.O_WRONLY | os.O_APPEND) as (a, b, fd):

        async def main():
            sender = send_in_pieces(b, payload[prefix_len:] + NEXT, 3)
            result = await land(a, fd, 0, payload[:prefix_len], size - prefix_len)
            sender.join()
            return result

        err = run(loop, main)
        assert isinstance(err, OSError) and not isinstance(err, ConnectionError)
        assert path.stat().st_size == prefix_len // GRAIN * GRAIN  # nothing after the error was written
        a.setblocking(True)
        assert a.recv(100) == NEXT


@pytest.mark.parametrize("loop", LOOPS)
def test_peer_gone_inside_the_payload_is_a_connection_error(tmp_path, loop):
    with wired(tmp_path / "image", bytes(1 << 20)) as (a, b, fd):

        async def main():
            b.sendall(b"\x01" * 5000)
            b.shutdown(socket.SHUT_WR)
            return await land(a, fd, 0, b"", 100_000)

        assert isinstance(run(loop, main), ConnectionError)
        # the whole grain landed; the 904 bytes of the next one were dropped with the connection
        assert (tmp_path / "image").read_bytes()[:5001] == b"\x01" * GRAIN + bytes(5001 - GRAIN)


@pytest.mark.parametrize("loop", LOOPS)
def test_close_stops_the_landing_without_calling_done(tmp_path, loop):
    calls = []
    with wired(tmp_path / "image", bytes(1 << 20)) as (a, b, fd):

        async def main():
            splicer = Splicer(asyncio.get_running_loop(), a.fileno())
            splicer.start(fd, 0, memoryview(b""), 100_000, calls.append)
            b.sendall(b"\x02" * 1000)
            await asyncio.sleep(0)  # one loop turn: the reader may run once
            splicer.close()
            b.sendall(b"\x03" * 100_000)
            for _ in range(10):  # later loop turns: no reader left to run
                await asyncio.sleep(0)

        run(loop, main)
        assert calls == []
        assert b"\x03" not in (tmp_path / "image").read_bytes()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_payload_that_stops_arriving_ends_after_the_stall_limit(tmp_path, loop):
    with wired(tmp_path / "image", bytes(1 << 20)) as (a, b, fd):

        async def main():
            finished = asyncio.get_running_loop().create_future()
            splicer = Splicer(asyncio.get_running_loop(), a.fileno())
            t0 = asyncio.get_running_loop().time()
            splicer.start(fd, 0, memoryview(b""), 100_000, finished.set_result, stall=0.3)
            b.sendall(b"\x04" * 5000)  # progress first: the limit counts from the last byte
            err = await asyncio.wait_for(finished, 30)
            splicer.close()
            return err, asyncio.get_running_loop().time() - t0

        err, took = run(loop, main)
        assert isinstance(err, ConnectionError) and "no byte" in str(err)
        assert took >= 0.3
        assert (tmp_path / "image").read_bytes()[:5001] == b"\x04" * GRAIN + bytes(5001 - GRAIN)


def _pending(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("offset", [0, 512, 3000])
def test_the_file_is_written_in_whole_grains_until_the_payload_ends(tmp_path, loop, offset):
    """Whatever sizes the socket delivers, what has landed before the payload's end ends on a
    multiple of GRAIN in the file: a server killed between two moves tears no sector.  The first
    300 pieces are single bytes, more than a pipe has buffers: the splicer must not stall on a
    pipe full of tiny buffers.  Each piece is consumed before the next is sent, so every
    intermediate state is seen."""
    rng = random.Random(offset)
    pieces = [1] * 300 + [rng.choice([17, 1000, 4095, 4096, 5000, 70_000]) for _ in range(60)]
    size = sum(pieces) + 1234
    pieces.append(1234)
    payload = bytes(rng.randrange(1, 256) for _ in range(size))  # no zero byte: the file's is all zeros
    prefix = payload[:777]
    with wired(tmp_path / "image", bytes(size + 8192)) as (a, b, fd):

        async def main():
            loop = asyncio.get_running_loop()
            finished: asyncio.Future = loop.create_future()
            splicer = Splicer(loop, a.fileno())
            ends = []
            try:
                splicer.start(fd, offset, memoryview(prefix), size - len(prefix), finished.set_result)
                pos = len(prefix)
                for n in pieces:
                    b.sendall(payload[pos : pos + n])
                    pos += n
                    for _ in range(1000):  # loop turns, each running the reader once
                        if not _pending(a) or finished.done():
                            break
                        await asyncio.sleep(0)
                    else:
                        raise AssertionError(f"the splicer stopped taking bytes after {pos - n}")
                    landed = os.pread(fd, size, offset).rstrip(b"\0")
                    assert landed == payload[: len(landed)]
                    ends.append(offset + len(landed))
                return await asyncio.wait_for(finished, 60), ends
            finally:
                splicer.close()

        result, ends = run(loop, main)
        assert result is None
        assert ends[-1] == offset + size
        torn = [e for e in ends[:-1] if e % GRAIN and e != offset]
        assert not torn, torn
        assert len(set(ends)) > 10  # it did land as it went, not all at the end
