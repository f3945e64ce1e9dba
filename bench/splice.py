#!/usr/bin/env python3
"""How much a large WRITE payload costs to land in a file: received into memory, or spliced.

A WRITE payload received into a buffer (``recv_into``) and written to the image (``pwritev``)
costs two copies per byte, socket to user memory and user memory to the page cache.
``splice(2)`` moves the socket's pages into a pipe and from the pipe into the file, so the first
copy goes away (the server lands large payloads so where it can: docs/landing.md).  This script
measures that difference alone, without NBD: a child process sends ``--size`` byte payloads over
a Unix stream socket (default buffers, as libnbd leaves them), and this process lands each one at
the next offset of a file on ``--workdir`` (tmpfs by default), one way or the other, alternating
between the two ways for ``--runs`` rounds.  The last payload of each run is checked against what
was sent.  It prints the receiver's throughput and CPU per MiB (user + system, from
``getrusage``) for each run.

Run from the repository: ``.venv/bin/python bench/splice.py`` (standard library only, Linux).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import random
import resource
import socket
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ from Python 3.10 on; spelled out for older ones


def receive_copy(sock: socket.socket, fd: int, size: int, count: int, span: int) -> None:
    """Each payload into one buffer, then one ``pwritev`` to the file."""
    buf = bytearray(size)
    view = memoryview(buf)
    for i in range(count):
        got = 0
        while got < size:
            got += sock.recv_into(view[got:])
        os.pwritev(fd, [buf], (i % span) * size)


def receive_splice(sock: socket.socket, fd: int, size: int, count: int, span: int) -> None:
    """Each payload from the socket into a pipe and from the pipe into the file."""
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, min(size, int(Path("/proc/sys/fs/pipe-max-size").read_text())))
        s = sock.fileno()
        for i in range(count):
            left, offset = size, (i % span) * size
            while left:
                n = os.splice(s, w, left)
                if n == 0:
                    raise ConnectionError("the sender closed early")
                left -= n
                while n:
                    m = os.splice(r, fd, n, offset_dst=offset)
                    offset += m
                    n -= m
    finally:
        os.close(r)
        os.close(w)


def payload(size: int) -> bytes:
    """What the sender sends (the same every time, so the receiver can check what landed)."""
    return random.Random(size).randbytes(size)


WAYS = {"copy": receive_copy, "splice": receive_splice}


def run_once(way: str, path: str, size: int, count: int, span: int) -> tuple[float, float]:
    """(MiB/s, receiver CPU µs per MiB) for ``count`` payloads of ``size`` bytes."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the sender
        b.close()
        data = payload(size)
        for _ in range(count):
            a.sendall(data)
        a.close()
        os._exit(0)
    a.close()
    fd = os.open(path, os.O_RDWR)
    try:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        WAYS[way](b, fd, size, count, span)
        secs, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    finally:
        os.close(fd)
        b.close()
        os.waitpid(pid, 0)
    with open(path, "rb") as f:  # the last payload landed where it belongs
        f.seek(((count - 1) % span) * size)
        if f.read(size) != payload(size):
            raise AssertionError(f"{way}: the file does not hold the payload sent")
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    mib = size * count / MiB
    return mib / secs, cpu / mib * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=MiB, help="payload bytes (default 1 MiB)")
    ap.add_argument("--count", type=int, default=3000, help="payloads per run (default 3000)")
    ap.add_argument("--runs", type=int, default=3, help="rounds of both ways (default 3)")
    ap.add_argument("--workdir", default="/dev/shm", help="where the file is made (default /dev/shm)")
    a = ap.parse_args()
    span = max(1, (1 << 30) // a.size)  # a 1 GiB file, written round and round
    with tempfile.NamedTemporaryFile(dir=a.workdir, prefix="nbdserve-splice-") as f:
        f.truncate(span * a.size)
        run_once("copy", f.name, a.size, span, span)  # allocate the file's pages first
        for r in range(a.runs):
            for way in WAYS:
                mibs, us = run_once(way, f.name, a.size, a.count, span)
                print(f"run {r + 1} {way:6} {mibs:8,.0f} MiB/s  receiver CPU {us:6.0f} µs/MiB", flush=True)


if __name__ == "__main__":
    main()
