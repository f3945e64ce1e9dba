"""qcow2 over NBD: nbdserve against qemu-nbd on the same images, and kill -9 crash safety.

Differential: qcow2 variants QEMU makes (filled with the shared qemu-io script), an internal
snapshot exported with ``-l``, and a raw -> qcow2 -> qcow2 chain, served by both servers (each
from its own copy): same size, ``qemu-img compare`` of the two URIs equal, the same merged
``base:allocation`` map and the same ``qemu:allocation-depth`` map (qemu-nbd with ``-A``).

Writes: one qemu-io script through each server (qemu-nbd with ``--discard=unmap``, whose zero
and trim semantics we copy); the two files then hold the same bytes and the same per-cluster
allocation, and ours passes ``qemu-img check``.

Crash: writes and flushes through libnbd, kill -9 mid-workload; ``qemu-img check`` reports no
corruption (leaks are allowed) and every write acknowledged before a completed flush is intact.

Wrong refcounts: an image whose L2 table has refcount 0 is exported read-only (and never
written) unless ``--repair=all`` (command line, ``--export`` option or config key) rebuilds it.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
import signal
import struct

import nbd
import pytest

from tests.conftest import SLOW
from tests.imagetest import FILL, CrashOracle, assert_same_export, check_clean, crash_workload
from tests.util import NBDSERVE, nbd_connect, qemu_img, qemu_io, qemu_nbd, run, serve

MiB = 1 << 20
VARIANTS = {
    "v2": "compat=0.10",
    "v3": "compat=1.1",
    "512": "cluster_size=512",
    "2M": "cluster_size=2M",
    "refcount1": "refcount_bits=1",
    "refcount64": "refcount_bits=64",
    "extl2": "extended_l2=on",
    "zstd": "compression_type=zstd",
}


def make(path, opts: str) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, path, "64M")
    cs = 2 * MiB if "2M" in opts else 65536
    qemu_io("qcow2", path, *FILL, f"write -c -P 0x44 4M {cs}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_qcow2_differential_vs_qemu_nbd(tmp_path, variant):
    img = tmp_path / "a.qcow2"
    make(img, VARIANTS[variant])
    ours = tmp_path / "ours.qcow2"
    shutil.copyfile(img, ours)
    with qemu_nbd(tmp_path, img, "qcow2", "-r", "-A") as q, serve(tmp_path, "-r", "-f", "qcow2", ours) as o:
        assert_same_export(o, q)


def test_qcow2_snapshot_export_vs_qemu_nbd(tmp_path):
    img = tmp_path / "s.qcow2"
    make(img, "compat=1.1")
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io("qcow2", img, "write -P 0x55 0 1M", "write -z 3M 64k")
    ours = tmp_path / "ours.qcow2"
    shutil.copyfile(img, ours)
    with (
        qemu_nbd(tmp_path, img, "qcow2", "-r", "-A", "-l", "s1") as q,
        serve(tmp_path, "-r", "-f", "qcow2", "-l", "s1", ours) as o,
    ):
        assert_same_export(o, q)


def test_qcow2_chain_vs_qemu_nbd(tmp_path):
    for d in ("q", "o"):
        w = tmp_path / d
        w.mkdir()
        qemu_img("create", "-q", "-f", "raw", w / "base.raw", "64M")
        qemu_io("raw", w / "base.raw", "write -P 1 0 2M", "write -P 2 40M 3M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", w / "mid.qcow2", "64M")
        qemu_io("qcow2", w / "mid.qcow2", "write -P 3 512k 64k", "write -z 1M 128k", "write -P 4 41M 100k")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", w / "top.qcow2", "64M")
        qemu_io("qcow2", w / "top.qcow2", *FILL)
    with (
        qemu_nbd(tmp_path, tmp_path / "q" / "top.qcow2", "qcow2", "-r", "-A") as q,
        serve(tmp_path, "-r", "-f", "qcow2", tmp_path / "o" / "top.qcow2") as o,
    ):
        assert_same_export(o, q)


def test_qcow2_snapshot_mode_overlay(tmp_path):
    """``-s``: writes land in a temporary overlay; the image itself is never written."""
    img = tmp_path / "ro.qcow2"
    make(img, "compat=1.1")
    before = img.read_bytes()
    with serve(tmp_path, "-s", "-f", "qcow2", img) as o:
        run("qemu-io", "-f", "raw", "-c", "write -P 0x71 3M 8k", "-c", "write -z 0 4k", o.uri)
        reads = ["-c", "read -P 0x71 3M 8k", "-c", "read -P 0 0 4k", "-c", "read -P 0xab 4k 60k"]
        out = run("qemu-io", "-f", "raw", *reads, o.uri).stdout
        assert "verification failed" not in out and out.count("read ") == 3, out
    assert img.read_bytes() == before


WRITE_SCRIPT = [
    "write -P 0x61 0 4k",
    "write -P 0x62 70k 200k",
    "write -P 0x63 4M 64k",  # into the compressed cluster
    "write -P 0x64 5000 3",  # unaligned, inside an allocated cluster
    "write -z 3M 64k",  # deallocate
    "write -z 3200k 100k",  # partial clusters of allocated data: explicit zeroes
    "aio_write -P 0x65 30M 8k",
    "aio_write -P 0x66 30M 4k",
    "aio_flush",
    "write -z -u 40M 1M",
    "write -z 50M 12345",
    "discard 63M 512k",
    "discard 20M 4k",
    "write -P 0x67 61M 3M",
    "flush",
]


@pytest.mark.parametrize("variant", ["v3", "v2", "extl2", "512"])
def test_qcow2_writes_match_qemu_nbd(tmp_path, variant):
    img = tmp_path / "w.qcow2"
    make(img, VARIANTS[variant])
    ours = tmp_path / "ours.qcow2"
    shutil.copyfile(img, ours)
    argv = []
    for c in WRITE_SCRIPT:
        argv += ["-c", c]
    with qemu_nbd(tmp_path, img, "qcow2", "--discard=unmap") as q:
        run("qemu-io", "-f", "raw", *argv, q.uri)
    with serve(tmp_path, "-f", "qcow2", ours) as o:
        run("qemu-io", "-f", "raw", *argv, o.uri)
    r = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", img, ours, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    check = run("qemu-img", "check", ours, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert per_cluster_types(ours) == per_cluster_types(img)


def per_cluster_types(path):
    """``qemu-img map`` as merged (start, length, present, zero, data) without host offsets."""
    out = []
    for e in json.loads(qemu_img("map", "--output=json", path).stdout):
        t = (e["present"], e["zero"] and not e["data"], e["data"])
        if out and out[-1][2:] == t and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], *t)
        else:
            out.append((e["start"], e["length"], *t))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("round", range(50 if SLOW else 5))
def test_qcow2_kill9_keeps_flushed_writes(tmp_path, round):
    rng = random.Random(round)
    base = tmp_path / "base.raw"
    qemu_img("create", "-q", "-f", "raw", base, "16M")
    qemu_io("raw", base, "write -P 0x5a 0 6M")
    img = tmp_path / "k.qcow2"
    opts = rng.choice(["cluster_size=4k", "cluster_size=64k", "cluster_size=512,refcount_bits=64", "extended_l2=on"])
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.raw", "-F", "raw", img, "16M")
    oracle = CrashOracle(base.read_bytes())
    with serve(tmp_path, "-f", "qcow2", img, check_stop=False) as srv:
        crash_workload(
            nbd_connect(srv.uri), rng, oracle, max_len=70000, ops=rng.randint(5, 60), in_flight=rng.randint(0, 12)
        )
        srv.stop(signal.SIGKILL)
    check = run("qemu-img", "check", "--output=json", img, check=False)
    assert check.returncode in (0, 3), check.stdout + check.stderr  # 3: leaks only
    assert json.loads(check.stdout).get("corruptions", 0) == 0
    out = tmp_path / "k.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", img, out)
    oracle.verify(out.read_bytes())


def lying_image(path) -> None:
    """A qcow2 whose L2 table has refcount 0: a data write would allocate over it."""
    qemu_img("create", "-q", "-f", "qcow2", path, "16M")
    qemu_io("qcow2", path, "write -P 0x21 0 64k")
    raw = bytearray(path.read_bytes())
    l1, rt = struct.unpack_from(">QQ", raw, 40)
    l2 = struct.unpack_from(">Q", raw, l1)[0] & 0x00FFFFFFFFFFFE00
    rb = struct.unpack_from(">Q", raw, rt)[0]
    struct.pack_into(">H", raw, rb + 2 * (l2 >> 16), 0)
    path.write_bytes(raw)


@pytest.mark.parametrize("repair", [None, "off", "leaks", "all"])
def test_qcow2_wrong_refcounts_over_nbd(tmp_path, repair):
    """Issue 14 item 12 through the CLI: without ``--repair=all`` the export is read-only (the
    client sees it at the handshake), with it the refcounts are rebuilt and writes land."""
    img = tmp_path / "lie.qcow2"
    lying_image(img)
    before = img.read_bytes()
    args = [] if repair is None else [f"--repair={repair}"]
    with serve(tmp_path, *args, "-f", "qcow2", img) as o:
        h = nbd_connect(o.uri)
        assert h.is_read_only() == (repair != "all")
        if repair == "all":
            h.pwrite(b"\x7e" * 70000, 16 * MiB - 70000)
            h.flush()
        assert h.pread(4096, 0) == b"\x21" * 4096
        h.shutdown()
        if repair != "all":
            assert "refcount" in o.log_text() and "read-only" in o.log_text()
    if repair == "all":
        check_clean(img)
        out = run(
            "qemu-io", "-f", "qcow2", "-c", f"read -P 0x7e {16 * MiB - 70000} 70000", "-c", "read -P 0x21 0 64k", img
        )
        assert "verification failed" not in out.stdout
    else:
        assert img.read_bytes() == before


def test_qcow2_repair_option_in_export_spec_and_config(tmp_path):
    img = tmp_path / "lie.qcow2"
    lying_image(img)
    conf = tmp_path / "c.toml"
    conf.write_text(f'[[export]]\nname = "t"\npath = "{img}"\nformat = "qcow2"\nrepair = "all"\n')
    with serve(tmp_path, "--config", conf, export="t") as o:
        assert not nbd_connect(o.uri).is_read_only()
    lying_image(img2 := tmp_path / "lie2.qcow2")
    with serve(tmp_path, "--export", f"u={img2},format=qcow2,repair=all", export="u") as o:
        assert not nbd_connect(o.uri).is_read_only()
    r = run(*NBDSERVE, "--repair=some", img2, check=False)
    assert r.returncode == 2 and "--repair" in r.stderr


def test_qcow2_write_onto_metadata_fails_with_eio(tmp_path):
    """Refcounts that start lying while the image is served (another program wrote the file):
    the allocating write that would land on the L2 table fails with EIO, nothing lands, later
    writes fail too, reads go on, and the image is marked corrupt."""
    img = tmp_path / "g.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    qemu_io("qcow2", img, "write -P 0x21 0 64k")
    with serve(tmp_path, "-f", "qcow2", img) as o:
        h = nbd_connect(o.uri)
        raw = bytearray(img.read_bytes())
        l1, rt = struct.unpack_from(">QQ", raw, 40)
        l2 = struct.unpack_from(">Q", raw, l1)[0] & 0x00FFFFFFFFFFFE00
        table = raw[l2 : l2 + 65536]
        rb = struct.unpack_from(">Q", raw, rt)[0]
        with open(img, "r+b") as f:  # the L2 table's refcount: 0
            f.seek(rb + 2 * (l2 >> 16))
            f.write(b"\0\0")
        with pytest.raises(nbd.Error) as info:
            for off in range(1 * MiB, 16 * MiB, 64 * 1024):  # fresh clusters: allocation runs
                h.pwrite(b"\xee" * 512, off + 7)
        assert info.value.errnum == errno.EIO
        with pytest.raises(nbd.Error):
            h.pwrite(b"x", 7)  # into an allocated cluster: refused too, the image is corrupt
        assert h.pread(65536, 0) == b"\x21" * 65536
        h.shutdown()
        assert "would overwrite an L2 table" in o.log_text()
    assert img.read_bytes()[l2 : l2 + 65536] == table
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["format-specific"]["data"]["corrupt"] is True
