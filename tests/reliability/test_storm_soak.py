"""Load over time: a connection storm and a short soak, against one server each.

* Storm: ``STORM_THREADS`` threads open ``STORM_CONNECTIONS`` connections in all, each doing one
  of: a full handshake and a read, a disconnect in the middle of the handshake, a disconnect right
  after connecting, a disconnect with requests in flight, silence (kept open until the handshake
  timeout closes it).  Afterwards the server has as many descriptors as before, its memory has not grown
  past ``STORM_GROWTH``, and a control client connected throughout still reads and writes.
* Soak: per format, four connections (multi-conn) run a random mix of writes, zeroes, trims,
  reads and flushes with many requests in flight, each on its own part of the disk, checked
  against a model as they go; then QEMU's check and a byte-for-byte compare with the model.
  The server's memory after the second half has not grown past ``SOAK_GROWTH`` over the first.

Bounded by counts, not time: ``NBDSERVE_SLOW=1`` multiplies them.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable

import nbd
import pytest

from tests.conftest import SLOW
from tests.imagetest import check_clean, compare_with_model
from tests.interop import nbdclient as raw
from tests.util import nbd_connect, qemu_img, serve

MiB = 1 << 20
STORM_THREADS = 16
STORM_CONNECTIONS = 20000 if SLOW else 1000
STORM_GROWTH = 16 * MiB
SOAK_OPS = 100000 if SLOW else 2000  # per format, over all connections
SOAK_GROWTH = 16 * MiB
FORMATS = ("raw", "qcow2", "qed", "vpc", "vhdx", "vmdk", "vdi")


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def in_threads(targets: list[Callable[[], None]]) -> None:
    """Run each target in its own thread; re-raise the first exception any of them raised."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# -- storm -------------------------------------------------------------------------------------------


def one_storm_connection(path: str, rng: random.Random, data: bytes, silent: list) -> None:
    kind = rng.randrange(5)
    c = raw.RawClient(path, timeout=60)
    if kind == 4:  # silent: kept open for the handshake timeout to close (checked at the end)
        silent.append(c)
        return
    with c:
        if kind == 0:  # gone at once
            return
        if kind == 1:  # gone mid-handshake
            c.greet()
            c.send_option(raw.OPT_GO, b"\0\0")  # a GO cut short
            return
        c.greet()
        c.go()
        off = rng.randrange(0, len(data) - 4096) & ~511
        if kind == 2:  # a full session
            assert c.pread(off, 4096) == data[off : off + 4096]
            c.disconnect()
            assert c.wait_closed()
            return
        for i in range(8):  # requests in flight, then gone without reading the replies
            c.request(raw.CMD_READ, i, off, 65536)


def test_connection_storm(tmp_path):
    img = tmp_path / "storm.img"
    data = os.urandom(8 * MiB)
    img.write_bytes(data)
    with serve(tmp_path, "--handshake-timeout", "2", "-e", str(STORM_CONNECTIONS), "-f", "raw", img) as srv:
        control = nbd_connect(srv.uri)
        silent: list[raw.RawClient] = []
        for i in range(50):  # warm up, then take the baseline
            one_storm_connection(str(srv.sock), random.Random(i), data, silent)
        for c in silent:
            assert c.wait_closed(timeout=60), "a silent client was never closed"
            c.close()
        silent.clear()
        fd0, rss0 = fds(srv.pid), rss(srv.pid)

        def worker(t: int) -> None:
            rng = random.Random(1000 + t)
            for _ in range(STORM_CONNECTIONS // STORM_THREADS):
                one_storm_connection(str(srv.sock), rng, data, silent)

        in_threads([lambda t=t: worker(t) for t in range(STORM_THREADS)])
        for c in silent:  # the handshake timeout closed them all
            assert c.wait_closed(timeout=60), "a silent client was never closed"
            c.close()
        control.pwrite(b"\x42" * 4096, 0)
        control.flush()
        assert control.pread(4096, 0) == b"\x42" * 4096
        # every storm connection is gone: wait for the server to have closed them (a bounded
        # number of control round trips, each of which lets the server's loop run)
        for _ in range(1000):
            if fds(srv.pid) <= fd0:
                break
            control.pread(512, 0)
        fd1, rss1 = fds(srv.pid), rss(srv.pid)
        control.shutdown()
        assert srv.alive()
        assert "Traceback" not in srv.log_text()
    print(
        f"\nstorm: {STORM_CONNECTIONS} connections from {STORM_THREADS} threads; descriptors {fd0} -> {fd1}, "
        f"RSS {rss0 >> 20} -> {rss1 >> 20} MiB"
    )
    assert fd1 <= fd0, f"descriptors leaked: {fd0} -> {fd1}"
    assert rss1 - rss0 <= STORM_GROWTH, f"RSS grew {(rss1 - rss0) >> 20} MiB"


# -- soak ----------------------------------------------------------------------------------------------


CREATE = {"vpc": ["-o", "force_size=on"], "vhdx": ["-o", "block_size=1M"], "qed": ["-o", "cluster_size=64k"]}


def soak_connection(h: nbd.NBD, rng: random.Random, model: bytearray, base: int, span: int, ops: int) -> None:
    """``ops`` random requests on ``[base, base + span)``, up to 16 in flight.  Requests in flight
    together never overlap (the server may run them in any order); a read waits for the writes
    before it and is checked against the model."""
    pending: list[tuple[int, int, int]] = []  # (cookie, start, end)

    def reap() -> None:
        """Retire completed requests; if none had completed, wait for the next reply first."""
        before = len(pending)
        pending[:] = [p for p in pending if not h.aio_command_completed(p[0])]
        if pending and len(pending) == before:
            h.poll(-1)

    def settle(start: int = 0, end: int = 1 << 63) -> None:
        while any(s < end and start < e for _, s, e in pending):
            reap()

    for _ in range(ops):
        off = base + rng.randrange(span - 1)
        n = min(rng.choice((512, 4096, 65536, rng.randint(1, 300000))), base + span - off)
        kind = rng.choice(("write", "write", "read", "read", "zero", "trim", "flush"))
        settle(off, off + n)
        if kind == "read":
            assert h.pread(n, off) == model[off : off + n], f"read at {off}+{n} differs from the model"
        elif kind == "write":
            data = rng.randbytes(n)
            pending.append((h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off), off, off + n))
            model[off : off + n] = data
        elif kind == "zero":
            pending.append((h.aio_zero(n, off), off, off + n))
            model[off : off + n] = bytes(n)
        elif kind == "trim":  # a trimmed range reads as zeroes or as before: the model takes what is read
            h.trim(n, off)
            model[off : off + n] = h.pread(n, off)
        else:
            pending.append((h.aio_flush(), 0, 0))
        while len(pending) >= 16:
            reap()
    settle()
    h.flush()


@pytest.mark.parametrize("fmt", FORMATS)
def test_soak(tmp_path, fmt):
    size = 64 * MiB
    img = tmp_path / f"soak.{fmt}"
    qemu_img("create", "-q", "-f", fmt, *CREATE.get(fmt, []), img, str(size))
    model = bytearray(size)
    conns, span = 4, size // 4
    per_round = SOAK_OPS // conns // 2
    with serve(tmp_path, "-f", fmt, img) as srv:
        handles = [nbd_connect(srv.uri) for _ in range(conns)]
        for h in handles:
            h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
        growth = []
        for half in range(2):
            in_threads(
                [
                    lambda i=i, h=h, half=half: soak_connection(
                        h, random.Random(f"{fmt}:{half}:{i}"), model, i * span, span, per_round
                    )
                    for i, h in enumerate(handles)
                ]
            )
            growth.append(rss(srv.pid))
        for h in handles:
            h.shutdown()
        assert srv.alive() and "Traceback" not in srv.log_text()
    if fmt not in ("raw", "vpc"):  # the formats qemu-img can check
        check_clean(img, fmt)
    compare_with_model(img, model, tmp_path, fmt)
    ops = 2 * per_round * conns
    print(f"\nsoak {fmt}: {ops} requests on {conns} connections; RSS {growth[0] >> 20} -> {growth[1] >> 20} MiB")
    assert growth[1] - growth[0] <= SOAK_GROWTH
