"""QEMU's own tools against nbdserve: qemu-io, qemu-img and qemu-nbd --list, over Unix sockets.

QEMU is the oracle: images read through the server equal the file, images written through it equal
their source, and ``qemu-img map`` of our export equals qemu-nbd's for the same file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.interop.conftest import DATA_RUNS, SIZE, MiB, expected_bytes, random_raw, write_sparse_raw
from tests.util import qemu_img, qemu_nbd, run, serve


def qemu_io_uri(uri: str, *cmds: str):
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    p = run(*argv, uri)
    assert "verification failed" not in p.stdout + p.stderr, p.stdout + p.stderr
    assert "error" not in p.stdout.lower() + p.stderr.lower(), p.stdout + p.stderr
    return p


def test_qemu_io_patterns(served, sparse_raw: Path) -> None:
    # Read what the file holds, byte-exact, through the server.
    qemu_io_uri(served.uri, *(f"read -P 0x{b:x} {off} {n}" for off, n, b in DATA_RUNS), "read -P 0 2M 1M")
    qemu_io_uri(
        served.uri,
        "write -P 0xab 3M 192k",
        "write -P 0xcd 12345 777",  # unaligned
        "write -z 1M 64k",
        "discard 8M 4k",
        "write -z 0 4k",
        "flush",
        "read -P 0xab 3M 192k",
        "read -P 0xcd 12345 777",
        "read -P 0 1M 64k",
        "read -P 0x5a 1088k 64k",
        "read -P 0 8M 4k",
        "read -P 0 0 4k",
        "read -P 0x11 4k 8k",
    )
    want = expected_bytes()
    want[3 * MiB : 3 * MiB + (192 << 10)] = b"\xab" * (192 << 10)
    want[12345 : 12345 + 777] = b"\xcd" * 777
    want[1 * MiB : 1 * MiB + (64 << 10)] = bytes(64 << 10)
    want[8 * MiB : 8 * MiB + 4096] = bytes(4096)
    want[0:4096] = bytes(4096)
    assert sparse_raw.read_bytes() == want


def test_qemu_io_many_aio_requests(served, sparse_raw: Path) -> None:
    n = 48
    writes = [f"aio_write -P 0x{(i % 250) + 1:x} {i * 64}k 64k" for i in range(n)]
    reads = [f"aio_read -P 0x{(i % 250) + 1:x} {i * 64}k 64k" for i in range(n)]
    p = qemu_io_uri(served.uri, *writes, "aio_flush", *reads, "aio_flush")
    assert p.stdout.count("wrote 65536/65536") == n
    assert p.stdout.count("read 65536/65536") == n
    data = sparse_raw.read_bytes()
    for i in range(n):
        assert data[i * 65536 : (i + 1) * 65536] == bytes([(i % 250) + 1]) * 65536, i


def test_qemu_img_info(served) -> None:
    info = json.loads(qemu_img("info", "--output=json", served.uri).stdout)
    assert info["virtual-size"] == SIZE
    assert info["format"] == "raw"


def test_qemu_img_convert_from_and_to_nbd(tmp_path: Path) -> None:
    src = random_raw(tmp_path / "src.img", 4 * MiB, seed=7)
    with open(src, "r+b") as f:  # a hole in the middle, to convert sparsely
        f.seek(1 * MiB)
        f.write(bytes(1 * MiB))
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(4 * MiB)
    with serve(tmp_path, "-f", "raw", target) as srv:
        # 16 coroutines writing out of order (-W): many requests in flight on qemu's NBD client.
        qemu_img("convert", "-n", "-W", "-m", "16", "-S", "64k", "-f", "raw", "-O", "raw", src, srv.uri)
        qemu_img("compare", "-f", "raw", "-F", "raw", src, srv.uri)
        # Out of the server again, into qcow2 and raw files.
        qemu_img("convert", "-f", "raw", "-O", "qcow2", srv.uri, tmp_path / "back.qcow2")
        qemu_img("convert", "-f", "raw", "-O", "raw", srv.uri, tmp_path / "back.raw")
    assert target.read_bytes() == src.read_bytes()
    assert (tmp_path / "back.raw").read_bytes() == src.read_bytes()
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, tmp_path / "back.qcow2")
    # compare must also notice a difference
    with open(target, "r+b") as f:
        f.seek(4608)
        f.write(b"\xff")
    with serve(tmp_path, "-f", "raw", "-r", target) as srv:
        p = qemu_img("compare", "-f", "raw", "-F", "raw", src, srv.uri, check=False)
        assert p.returncode == 1, p.stdout + p.stderr
        assert "Content mismatch at offset 4608" in p.stdout


def test_qemu_img_map_equals_qemu_nbd(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "map.img")
    with serve(tmp_path, "-f", "raw", "-r", img) as ours:
        got = json.loads(qemu_img("map", "--output=json", "-f", "raw", ours.uri).stdout)
    with qemu_nbd(tmp_path, img, "raw", "-r") as oracle:
        want = json.loads(qemu_img("map", "--output=json", "-f", "raw", oracle.uri).stdout)
    assert got == want
    assert any(e["data"] for e in got) and any(not e["data"] for e in got)


def test_qemu_nbd_list_shows_exports_and_descriptions(tmp_path: Path) -> None:
    a = write_sparse_raw(tmp_path / "a.img")
    b = write_sparse_raw(tmp_path / "b.img", size=2 * MiB, runs=())
    with serve(
        tmp_path,
        "--export",
        f"alpha={a},format=raw,description=the first disk",
        "--export",
        f"beta={b},format=raw,readonly,description=second (read-only)",
    ) as srv:
        out = run("qemu-nbd", "-L", "-k", srv.sock).stdout
    assert "exports available: 2" in out
    blocks = dict(re.findall(r"export: '([^']*)'\n((?:  .*\n?)*)", out))
    assert set(blocks) == {"alpha", "beta"}
    assert "description: the first disk" in blocks["alpha"]
    assert "description: second (read-only)" in blocks["beta"]
    assert f"size:  {SIZE}" in blocks["alpha"]
    assert f"size:  {2 * MiB}" in blocks["beta"]
    assert "base:allocation" in blocks["alpha"] and "qemu:allocation-depth" in blocks["alpha"]
    # flags: READ_ONLY (bit 1) only on beta
    flags = {name: int(re.search(r"flags: 0x([0-9a-f]+)", text).group(1), 16) for name, text in blocks.items()}
    assert flags["beta"] & 2 and not flags["alpha"] & 2
