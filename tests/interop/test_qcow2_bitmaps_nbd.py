"""qcow2 persistent dirty bitmaps over NBD, with real clients, QEMU as the oracle.

* Bitmaps made by ``qemu-img bitmap`` (enabled and disabled, granularities 512 B to 1 MiB) are
  written through nbdserve by several libnbd connections at once (asynchronous, unaligned
  writes, zeroes, trims): nbdserve's ``-B`` export of each bitmap (live, and after a restart)
  equals a model of what was written and QEMU's view of the file (``qemu-nbd -B`` +
  ``nbdinfo --map``); ``qemu-img check`` is clean and the data compare equal.
* kill -9: the file holds in-use bitmaps exactly as a killed qemu-nbd leaves them (``qemu-img
  info`` and ``qemu-img check`` say the same for both); both servers then refuse to export them.
* An incremental backup end to end: full copy with nbdcopy, writes, copies of only the extents
  ``qemu:dirty-bitmap:NAME`` reports, checkpoints rotated with ``qemu-img bitmap`` between
  rounds, ``qemu-img compare`` of the reconstructed copy with the source.
* Bitmaps of a backing file, meta-context listing, and the refusals, against qemu-nbd.
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import nbd
import pytest

from tests.imagetest import check_clean, compare_with_model, run_streams
from tests.util import NBDSERVE, merged_map, qemu_img, qemu_io, qemu_nbd, run, serve

K, M = 1 << 10, 1 << 20
SIZE = 24 * M
CONNS = 3
STRIPE = SIZE // CONNS
DIRTY = "qemu:dirty-bitmap:"


class BitmapModel:
    """Dirty granules per bitmap (only enabled bitmaps take new marks)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.bitmaps: dict[str, tuple[int, bool, set[int]]] = {}

    def add(self, name: str, gbits: int) -> None:
        self.bitmaps[name] = (gbits, True, set())

    def disable(self, name: str) -> None:
        g, _, d = self.bitmaps[name]
        self.bitmaps[name] = (g, False, d)

    def touched(self, off: int, n: int) -> None:
        for g, enabled, dirty in self.bitmaps.values():
            if enabled:
                dirty.update(range(off >> g, ((off + n - 1) >> g) + 1))

    def map(self, name: str) -> list[tuple[int, int, int]]:
        """As ``tests.util.merged_map`` shows a ``qemu:dirty-bitmap:`` context."""
        g, _, dirty = self.bitmaps[name]
        out: list[tuple[int, int, int]] = []
        for i in range(-(-self.size >> g)):
            lo, hi, v = i << g, min(self.size, (i + 1) << g), int(i in dirty)
            if out and out[-1][2] == v:
                out[-1] = (out[-1][0], hi - out[-1][0], v)
            else:
                out.append((lo, hi - lo, v))
        return out


def make(path: Path, cluster_size: int, model: BitmapModel) -> bytearray:
    """The test image: data, and bitmaps of every kind, some dirty before nbdserve sees them.
    Returns the disk's contents."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", path, str(SIZE))
    disk = bytearray(SIZE)
    qemu_io("qcow2", path, "write -P 0x11 1M 300k", "write -P 0x22 17M 64k")
    disk[M : M + 300 * K] = b"\x11" * (300 * K)
    disk[17 * M : 17 * M + 64 * K] = b"\x22" * (64 * K)
    for name, gran in (("coarse", 16), ("off", 12), ("fine", 9)):
        qemu_img("bitmap", "--add", "-g", str(1 << gran), path, name)
        model.add(name, gran)
    qemu_io("qcow2", path, "write -P 0x33 5000 3", "write -P 0x44 9M 70k")
    disk[5000:5003] = b"\x33" * 3
    disk[9 * M : 9 * M + 70 * K] = b"\x44" * (70 * K)
    model.touched(5000, 3)
    model.touched(9 * M, 70 * K)
    qemu_img("bitmap", "--disable", path, "off")
    model.disable("off")
    qemu_img("bitmap", "--add", "-g", str(1 << 20), path, "mega")
    model.add("mega", 20)
    return disk


def plan(seed: int) -> list[list[tuple[str, int, int]]]:
    rng = random.Random(seed)
    kinds = ["write"] * 4 + ["zero", "zero_nohole", "trim", "flush"]
    lengths = [1, 511, 4 * K + 3, 70 * K, 300 * K]
    return [[(rng.choice(kinds), rng.randrange(STRIPE), rng.choice(lengths)) for _ in range(40)] for _ in range(CONNS)]


def qcow2_trim(cluster_size: int):
    """nbdserve's TRIM on a version 3 qcow2 without a backing file: whole clusters read as zeroes."""

    def trim(model: bytearray, off: int, n: int) -> None:
        lo, hi = -(-off // cluster_size) * cluster_size, (off + n) // cluster_size * cluster_size
        if hi > lo:
            model[lo:hi] = bytes(hi - lo)

    return trim


def bitmap_args(model: BitmapModel) -> list[str]:
    return [a for name in model.bitmaps for a in ("-B", name)]


def qemu_view(tmp: Path, path: Path, model: BitmapModel) -> dict[str, list]:
    with qemu_nbd(tmp, path, "qcow2", "-r", *bitmap_args(model)) as q:
        return {name: merged_map(q.uri, DIRTY + name) for name in model.bitmaps}


def our_view(uri: str, model: BitmapModel) -> dict[str, list]:
    return {name: merged_map(uri, DIRTY + name) for name in model.bitmaps}


def bitmap_flags(path: Path) -> list[tuple[str, list[str], int]]:
    info = json.loads(qemu_img("info", "-U", "--output=json", path).stdout)
    return [(b["name"], b["flags"], b["granularity"]) for b in info["format-specific"]["data"].get("bitmaps", [])]


# -- must show: several connections, QEMU's view, the model -----------------------------------------


@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_bitmaps_written_over_nbd_match_qemu_and_model(tmp_path, cluster_size):
    path = tmp_path / "b.qcow2"
    model = BitmapModel(SIZE)
    disk = make(path, cluster_size, model)
    before = bitmap_flags(path)
    assert qemu_view(tmp_path, path, model) == {n: model.map(n) for n in model.bitmaps}  # the start
    with serve(tmp_path, *bitmap_args(model), path) as srv:
        run_streams(srv.uri, plan(cluster_size), disk, cluster_size, stripe=STRIPE, trim=qcow2_trim(cluster_size),
                    touched=model.touched)  # fmt: skip
        expected = {n: model.map(n) for n in model.bitmaps}
        assert any(len(m) > 20 for m in expected.values())  # the workload dirtied many places
        assert our_view(srv.uri, model) == expected  # live, while serving
    check_clean(path)
    compare_with_model(path, disk, tmp_path, "qcow2")
    assert bitmap_flags(path) == before  # stored, not in use, enabled ones still enabled
    assert qemu_view(tmp_path, path, model) == expected
    with serve(tmp_path, "-r", *bitmap_args(model), path) as srv:
        assert our_view(srv.uri, model) == expected
        assert {n: qemu_client_view(srv.sock, n) for n in model.bitmaps} == expected


def qemu_client_view(sock: Path, name: str) -> list[tuple[int, int, int]]:
    """QEMU's NBD client reading ``qemu:dirty-bitmap:NAME`` (``x-dirty-bitmap``: a dirty range
    shows as "data": false)."""
    opts = f"driver=nbd,server.type=unix,server.path={sock},x-dirty-bitmap={DIRTY}{name}"
    rows = json.loads(qemu_img("map", "--output=json", "--image-opts", opts).stdout)
    out: list[tuple[int, int, int]] = []
    for r in rows:
        v = int(not r["data"])
        if out and out[-1][2] == v:
            out[-1] = (out[-1][0], out[-1][1] + r["length"], v)
        else:
            out.append((r["start"], r["length"], v))
    return out


# -- must show: kill -9, as QEMU leaves it ------------------------------------------------------


def test_kill9_leaves_bitmaps_in_use_exactly_as_qemu_nbd(tmp_path):
    model = BitmapModel(SIZE)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    make(ours, 65536, model)
    theirs.write_bytes(ours.read_bytes())
    with qemu_nbd(tmp_path, theirs, "qcow2") as q, serve(tmp_path, ours, check_stop=False) as o:
        for srv in (q, o):
            h = nbd.NBD()
            h.connect_uri(srv.uri)
            h.pwrite(b"\x55" * 5000, 3 * M + 7)
            h.zero(100 * K, 11 * M)
            h.trim(200 * K, 20 * M + 1)
            h.flush()
            h.shutdown()
        for srv in (q, o):
            srv.stop(signal.SIGKILL)
    assert (
        bitmap_flags(ours)
        == bitmap_flags(theirs)
        == [
            ("coarse", ["in-use", "auto"], 65536),
            ("off", ["in-use"], 4096),
            ("fine", ["in-use", "auto"], 512),
            ("mega", ["in-use", "auto"], 1 << 20),
        ]
    )
    checks = [run("qemu-img", "check", "--output=json", p, check=False) for p in (ours, theirs)]
    assert [c.returncode for c in checks] == [0, 0]
    strip = [{k: v for k, v in json.loads(c.stdout).items() if k != "filename"} for c in checks]
    assert strip[0] == strip[1]
    human = [run("qemu-img", "check", p).stdout for p in (ours, theirs)]
    assert human[0] == human[1] and "No errors were found on the image." in human[0]
    # Both refuse to export an in-use bitmap, and serve the image anyway.
    for path in (ours, theirs):
        p = run("qemu-nbd", "-r", "-k", tmp_path / "never.sock", "-B", "fine", path, check=False)
        assert p.returncode != 0 and "'fine' is inconsistent" in p.stderr
        p = run(*NBDSERVE, "-r", "-k", tmp_path / "never.sock", "-B", "fine", path, check=False)
        assert p.returncode != 0
        last = p.stderr.strip().splitlines()[-1]  # (after the warning about in-use bitmaps)
        assert "'fine' is inconsistent" in last and "cannot be used" in last, p.stderr
    with serve(tmp_path, ours) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        h.pwrite(b"\x66" * 10, 0)
        h.shutdown()
    assert "in use (not closed cleanly)" in srv.log_text()
    assert bitmap_flags(ours) == bitmap_flags(theirs)  # still in use: never trusted again, as in QEMU
    check_clean(ours)


# -- must show: incremental backup ----------------------------------------------------------------


def dirty_extents(uri: str, bitmap: str) -> list[tuple[int, int]]:
    """The dirty extents of ``qemu:dirty-bitmap:BITMAP``, by libnbd block status."""
    h = nbd.NBD()
    h.add_meta_context(DIRTY + bitmap)
    h.connect_uri(uri)
    assert h.can_meta_context(DIRTY + bitmap)
    size, out, pos = h.get_size(), [], 0

    def cb(context: str, offset: int, entries: list[int], err) -> None:
        nonlocal pos
        assert context == DIRTY + bitmap
        for i in range(0, len(entries), 2):
            if entries[i + 1] & 1:
                if out and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], out[-1][1] + entries[i])
                else:
                    out.append((pos, entries[i]))
            pos += entries[i]

    while pos < size:
        start = pos
        h.block_status(min(size - pos, 64 * M), pos, cb)
        assert pos > start
    h.shutdown()
    return out


def copy_extents(uri: str, extents: list[tuple[int, int]], target: Path) -> int:
    h = nbd.NBD()
    h.connect_uri(uri)
    copied = 0
    with open(target, "r+b") as f:
        for off, n in extents:
            for pos in range(off, off + n, 4 * M):
                chunk = min(4 * M, off + n - pos)
                f.seek(pos)
                f.write(h.pread(chunk, pos))
                copied += chunk
    h.shutdown()
    return copied


def test_incremental_backup_end_to_end(tmp_path):
    src = tmp_path / "src.qcow2"
    backup = tmp_path / "backup.raw"
    qemu_img("create", "-q", "-f", "qcow2", src, str(SIZE))
    qemu_io("qcow2", src, "write -P 0x10 0 8M", "write -P 0x20 12M 3M", "write -c -P 0x30 20M 1M")
    qemu_img("bitmap", "--add", src, "chk1")  # the checkpoint of the full backup
    with serve(tmp_path, "-r", src) as srv:
        run("nbdcopy", srv.uri, backup)
    disk = bytearray(backup.read_bytes())
    rng = random.Random(7)
    for checkpoint, nxt in (("chk1", "chk2"), ("chk2", "chk3")):
        with serve(tmp_path, src) as srv:  # the guest writes
            run_streams(srv.uri, plan(rng.randrange(1 << 30)), disk, 5, stripe=STRIPE, trim=qcow2_trim(65536))
        # Backup tool: freeze the checkpoint, start the next one, copy what the frozen one says.
        qemu_img("bitmap", "--disable", src, checkpoint)
        qemu_img("bitmap", "--add", src, nxt)
        with serve(tmp_path, "-r", "-B", checkpoint, src) as srv:
            extents = dirty_extents(srv.uri, checkpoint)
            copied = copy_extents(srv.uri, extents, backup)
        assert 0 < copied < SIZE // 2, copied  # only the dirty extents
        qemu_img("bitmap", "--remove", src, checkpoint)
        assert bytes(disk) == backup.read_bytes()  # the model agrees...
        p = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", src, backup, check=False)
        assert p.returncode == 0, p.stdout + p.stderr  # ...and so does QEMU
    check_clean(src)
    assert [n for n, _, _ in bitmap_flags(src)] == ["chk3"]


# -- backing files, listing, refusals, configuration --------------------------------------------------


def test_backing_file_bitmap_exported_as_qemu_nbd_does(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "8M")
    qemu_img("bitmap", "--add", "-g", "4096", base, "inbase")
    qemu_io("qcow2", base, "write 1M 5000", "write 7M 1")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io("qcow2", top, "write 3M 64k")
    for ro in (["-r"], []):
        with qemu_nbd(tmp_path, top, "qcow2", *ro, "-B", "inbase") as q:
            theirs = merged_map(q.uri, DIRTY + "inbase")
        with serve(tmp_path, *ro, "-B", "inbase", top) as o:
            assert merged_map(o.uri, DIRTY + "inbase") == theirs
        assert theirs == [(0, M, 0), (M, 8192, 1), (M + 8192, 6 * M - 8192, 0), (7 * M, 4096, 1),
                          (7 * M + 4096, M - 4096, 0)]  # fmt: skip


def list_contexts(uri: str, query: str | None) -> list[str]:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    if query is not None:
        h.add_meta_context(query)
    got: list[str] = []
    h.opt_list_meta_context(lambda name: got.append(name))
    h.opt_abort()
    return sorted(got)


def test_meta_contexts_listed_and_set_as_qemu_nbd(tmp_path):
    path = tmp_path / "l.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    for name in ("one", "two"):
        qemu_img("bitmap", "--add", path, name)
    queries = [None, "qemu:", DIRTY, "base:", DIRTY + "two", DIRTY + "nope", "qemu:dirty-bitmap"]
    with qemu_nbd(tmp_path, path, "qcow2", "-A", "-B", "one", "-B", "two") as q:
        theirs = [list_contexts(q.uri, x) for x in queries]
    with serve(tmp_path, "-B", "one", "-B", "two", path) as o:
        assert [list_contexts(o.uri, x) for x in queries] == theirs
        h = nbd.NBD()
        for c in ("base:allocation", DIRTY + "two", DIRTY, "qemu:"):
            h.add_meta_context(c)
        h.connect_uri(o.uri)
        assert h.can_meta_context(DIRTY + "two") and h.can_meta_context("base:allocation")
        assert not h.can_meta_context(DIRTY + "one") and not h.can_meta_context(DIRTY)
        seen = {}
        h.block_status(4 * M, 0, lambda ctx, off, entries, err: seen.setdefault(ctx, list(entries)))
        assert seen == {"base:allocation": [4 * M, 3], DIRTY + "two": [4 * M, 0]}
        h.shutdown()
    assert theirs[0] == sorted(["base:allocation", "qemu:allocation-depth", DIRTY + "one", DIRTY + "two"])


def test_bitmap_refusals_like_qemu_nbd(tmp_path):
    path = tmp_path / "r.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_img("bitmap", "--add", path, "b")
    raw = tmp_path / "r.raw"
    qemu_img("create", "-q", "-f", "raw", raw, "4M")
    for image, fmt, name, needle in ((path, "qcow2", "nope", "'nope' not found"), (raw, "raw", "b", "'b' not found")):
        p = run("qemu-nbd", "-f", fmt, "-k", tmp_path / "never.sock", "-B", name, image, check=False)
        assert p.returncode != 0 and f"'{name}' is not found" in p.stderr
        p = run(*NBDSERVE, "-f", fmt, "-k", tmp_path / "never.sock", "-B", name, image, check=False)
        assert p.returncode != 0 and needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert bitmap_flags(path) == [("b", ["auto"], 65536)]  # the refused read-write open left it clean


def test_bitmaps_from_export_spec_and_config(tmp_path):
    path = tmp_path / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    for name in ("x", "y"):
        qemu_img("bitmap", "--add", path, name)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[export]]\nname = "t"\npath = "{path}"\nreadonly = true\nbitmaps = ["x", "y"]\n')
    with serve(tmp_path, "--config", cfg, "--export", f"s={path},readonly,bitmap=y") as srv:
        assert list_contexts(srv.uri_for("t"), DIRTY) == [DIRTY + "x", DIRTY + "y"]
        assert list_contexts(srv.uri_for("s"), DIRTY) == [DIRTY + "y"]
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[[export]]\npath = "{path}"\nbitmaps = 3\n')
    p = run(*NBDSERVE, "--config", bad, check=False)
    assert p.returncode == 2 and "bitmaps: expected a string or a list of strings" in p.stderr
