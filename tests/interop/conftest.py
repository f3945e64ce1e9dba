"""Fixtures for the interop suite: generated raw images and a running nbdserve for them.

Every test here talks to a real server process over a real socket.  Images are small and sparse,
generated in the test's ``tmp_path``; nothing is committed.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from tests.tlscerts import Pki
from tests.util import Served, serve

MiB = 1 << 20
SIZE = 16 * MiB
# (offset, length, fill byte) of the allocated parts of ``sparse_raw``; everything else is a hole.
DATA_RUNS = ((0, 64 << 10, 0x11), (1 * MiB, 128 << 10, 0x5A), (8 * MiB, 4096, 0x22), (SIZE - 8192, 8192, 0x77))


def write_sparse_raw(path: Path, size: int = SIZE, runs=DATA_RUNS) -> Path:
    """A sparse raw image: ``runs`` of (offset, length, byte) are data, the rest holes."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n, byte in runs:
            f.seek(off)
            f.write(bytes([byte]) * n)
    return path


def expected_bytes(size: int = SIZE, runs=DATA_RUNS) -> bytearray:
    out = bytearray(size)
    for off, n, byte in runs:
        out[off : off + n] = bytes([byte]) * n
    return out


def random_raw(path: Path, size: int, seed: int = 1) -> Path:
    """A fully allocated raw image of pseudo-random bytes (reproducible)."""
    import random

    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.write(rnd.randbytes(size))
    return path


def seek_data_ranges(path: Path) -> list[tuple[int, int]]:
    """The file's data ranges as the host filesystem reports them (SEEK_DATA/SEEK_HOLE)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


POOL = 32  # fresh exports per module; a module needing more must raise this


class ExportPool:
    """One server per test module with ``POOL`` writable exports ``rw0..`` (each its own fresh
    ``sparse_raw`` image) and one read-only export ``ro``: a test takes a fresh export instead of
    paying for a server start."""

    def __init__(self, srv: Served, paths: list[Path], ro_path: Path) -> None:
        self.srv = srv
        self.paths = paths
        self.ro_path = ro_path
        self.next = 0

    def take(self) -> tuple[Served, Path]:
        assert self.next < len(self.paths), "export pool exhausted: raise POOL"
        i, self.next = self.next, self.next + 1
        return replace(self.srv, export=f"rw{i}"), self.paths[i]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("pool")
    paths = [write_sparse_raw(d / f"rw{i}.img") for i in range(POOL)]
    ro_path = write_sparse_raw(d / "ro.img")
    args = [a for i, p in enumerate(paths) for a in ("--export", f"rw{i}={p},format=raw")]
    with serve(d, *args, "--export", f"ro={ro_path},format=raw,readonly") as srv:
        yield ExportPool(srv, paths, ro_path)


@pytest.fixture
def _slot(pool: ExportPool):
    srv, path = pool.take()
    yield srv, path
    assert pool.srv.alive(), f"the server died:\n{pool.srv.log_text()}"


@pytest.fixture
def served(_slot) -> Served:
    """nbdserve serving a fresh ``sparse_raw`` image read-write as raw (export ``served.export``)."""
    return _slot[0]


@pytest.fixture
def sparse_raw(_slot) -> Path:
    """The image file behind ``served``."""
    return _slot[1]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """CA, server and client credentials for the TLS tests (see ``tests/tlscerts.py``)."""
    return Pki.make(tmp_path_factory.mktemp("pki"))
