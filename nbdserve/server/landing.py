"""Landing a large WRITE payload in the image file straight from the socket, with ``splice(2)``.

Owns ``Splicer``, one per plaintext connection that has landed a payload: a pipe, a duplicate
of the connection's socket descriptor, and the state of the one payload being landed.  The
session decides *whether* a payload lands (``Session._land``: a plain WRITE, on a plaintext
socket, whose image maps the whole range to a local file as it is: ``Image.landing``); this
module only moves the bytes.

Why: a payload received into memory and then written costs two kernel copies per byte (socket to
user memory, user memory to the page cache); spliced, the socket's pages move into the pipe and
only the pipe-to-file step copies.  ``bench/splice.py`` measures the difference alone.

How: the session stops its transport reading (the rest of the payload waits in the kernel), the
part of the payload already received is written with ``pwrite``, and a reader on the duplicated
descriptor (the loop refuses a second reader on the transport's own) moves what the socket holds
into the pipe (``SPLICE_F_NONBLOCK``) and from the pipe to the file at the next offset, until
``length`` bytes are in.  Then ``done(error)`` is called once and the session resumes its
transport, whose next bytes are the next request's header.

Whole grains: the socket hands over bytes in pieces of any size, but the file is only ever
written up to a multiple of ``GRAIN`` (4 KiB, by file offset; the payload's own end is the one
exception).  The bytes after the last such boundary wait in the pipe for the next piece.  So a
server killed between two moves leaves the payload's landed part ending on a page boundary of the
file, where a killed ``pwrite`` would also stop (the kernel ends a buffered write early only
between pages), and no guest sector is left torn: every format here places data at file offsets
congruent to their guest offsets modulo 512 (modulo 4096 for 4 KiB-sector images).

Invariants:
  * Between moves the pipe holds fewer than ``GRAIN`` bytes, in one buffer (the rest is read
    out and written back in one piece), so the next move always finds room and ``EAGAIN`` from
    the socket side means the socket is drained.  Every byte taken from the socket is in the
    pipe, in the file at its own offset, or, after a file error, discarded; exactly the payload's
    bytes are taken from the socket, never the next request's.
  * A file error (ENOSPC, EIO) does not stop the landing: the rest of the payload is still
    taken off the socket (and discarded), so the connection stays in step; ``done`` gets the
    first error, and the request's error reply follows.  A socket error or end of stream is
    ``done(ConnectionError)``: the session ends the connection.
  * A landing holds its range (other writes and trims of it wait, see docs/landing.md), so a
    client may not pause inside the payload for long: after ``stall`` seconds without a byte
    (``--payload-timeout``) the landing ends with ``done(ConnectionError)`` too.
  * ``close`` (the connection is gone) removes the reader before anything else can run, so no
    byte is written after it; ``done`` is then never called.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Callable

PIPE_SIZE = 1 << 20  # asked for; the kernel caps it at /proc/sys/fs/pipe-max-size for the unprivileged
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
GRAIN = 4096  # the file is written up to multiples of this (see the module docstring); <= PIPE_BUF


class Splicer:
    def __init__(self, loop: asyncio.AbstractEventLoop, sock_fd: int) -> None:
        """For the connection whose socket descriptor is ``sock_fd`` (not taken over: a duplicate
        is kept, closed by ``close``)."""
        self.loop = loop
        self._sock = os.dup(sock_fd)
        try:
            self._pipe_r, self._pipe_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except BaseException:
            os.close(self._sock)
            raise
        try:
            self.capacity = fcntl.fcntl(self._pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            self.capacity = 1 << 16  # the kernel's default pipe size
        self._dest = -1
        self._offset = 0  # file offset of the first byte in the pipe
        self._in_pipe = 0  # payload bytes in the pipe, not yet in the file (< GRAIN between moves)
        self._left = 0  # payload bytes still in the socket
        self._error: OSError | None = None
        self._done: Callable[[BaseException | None], None] | None = None
        self._stall = 0.0
        self._last = 0.0  # loop time of the last byte taken
        self._timer: asyncio.TimerHandle | None = None

    @property
    def busy(self) -> bool:
        return self._done is not None

    def start(
        self,
        dest: int,
        offset: int,
        received: memoryview,
        left: int,
        done: Callable[[BaseException | None], None],
        stall: float = 0.0,
    ) -> None:
        """Land a payload at ``offset`` of the file ``dest``: ``received`` (its first bytes,
        already read from the socket) now, then the ``left`` bytes that follow in the socket as
        they arrive.  ``done(error)`` is called once, from the loop, when all of them are taken
        (or none came for ``stall`` seconds; 0: no limit).  The caller has stopped its transport
        reading and keeps ``dest`` open until then."""
        assert self._done is None, "one payload at a time"
        self._dest, self._offset, self._left, self._error, self._done = dest, offset, left, None, done
        self._stall, self._last = stall, self.loop.time()
        if stall > 0:
            self._timer = self.loop.call_later(stall, self._check_stall)
        cut = max(0, (offset + len(received)) // GRAIN * GRAIN - offset)  # whole grains end here
        pos = 0
        while pos < cut and self._error is None:
            try:
                pos += os.pwrite(dest, received[pos:cut], offset + pos)
            except OSError as e:
                self._error = e
        self._offset = offset + cut
        self._in_pipe = len(received) - cut  # < GRAIN: an empty pipe takes it whole
        if self._in_pipe:
            os.write(self._pipe_w, received[cut:])
        self.loop.add_reader(self._sock, self._move)

    def _move(self) -> None:
        """The socket is readable: move what it holds of the payload through the pipe."""
        while self._left:
            try:
                n = os.splice(self._sock, self._pipe_w, min(self._left, self.capacity - GRAIN), flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return
            except OSError as e:
                self._finish(ConnectionError(f"receiving a WRITE payload: {e}"))
                return
            if n == 0:
                self._finish(ConnectionError("the client closed the connection inside a WRITE payload"))
                return
            self._last = self.loop.time()
            self._left -= n
            self._in_pipe += n
            self._empty_pipe()
        self._finish(self._error)

    def _empty_pipe(self) -> None:
        """Move the pipe's bytes to the file at the next offset, up to the last grain boundary (all
        of them once the payload is in; after a file error: discard them all).  What stays is
        gathered into one pipe buffer."""
        end = self._offset + self._in_pipe
        if self._left and self._error is None:
            end = max(self._offset, end // GRAIN * GRAIN)
        n = end - self._offset if self._error is None else self._in_pipe
        while n:
            if self._error is None:
                try:
                    m = os.splice(self._pipe_r, self._dest, n, offset_dst=self._offset)
                except OSError as e:
                    self._error = e
                    n = self._in_pipe
                    continue
            else:
                m = len(os.read(self._pipe_r, n))
            self._offset += m
            self._in_pipe -= m
            n -= m
        if self._in_pipe:
            # Bytes from many small socket reads sit in as many pipe buffers; a pipe with all its
            # buffers taken would refuse the next move while the socket still holds data.
            rest = os.read(self._pipe_r, self._in_pipe)
            assert len(rest) == self._in_pipe
            os.write(self._pipe_w, rest)

    def _check_stall(self) -> None:
        quiet = self.loop.time() - self._last
        if quiet < self._stall:
            self._timer = self.loop.call_later(self._stall - quiet, self._check_stall)
            return
        self._timer = None
        self._finish(ConnectionError(f"no byte of a WRITE payload for {self._stall:g} s"))

    def _finish(self, error: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.loop.remove_reader(self._sock)
        done, self._done = self._done, None
        self._dest = -1
        if done is not None:
            done(error)

    def close(self) -> None:
        """The connection is gone: stop (``done`` is not called) and release the descriptors."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.loop.remove_reader(self._sock)
        self._done = None
        for fd in (self._sock, self._pipe_r, self._pipe_w):
            os.close(fd)
