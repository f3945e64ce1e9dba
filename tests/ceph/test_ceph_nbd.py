"""rbd: and s3:// exports end to end: nbdserve processes serving images of the session's cluster to
real clients over real sockets, with QEMU's own rbd driver as the oracle.

What each test shows:
  * bytes: ``qemu-img compare`` of ``rbd:pool/image`` opened by QEMU against the nbd:// export,
    for a raw image and for a qcow2 image stored in RBD (the format driver runs on RbdStorage);
  * allocation: ``nbdinfo --map`` of a raw RBD export equals the object map (``diff_iterate``);
  * a seeded write/zero/trim/flush workload through libnbd equals a model when read back through
    QEMU's rbd: driver (raw and qcow2 in RBD; ``qemu-img check`` of the qcow2 is clean);
  * fio (``ioengine=nbd``, ``verify=crc32c``) and nbdcopy through an RBD export and through an S3
    export with an ``--overlay``;
  * locking between processes: a second writer is refused in one line, readers and @snap exports
    are served meanwhile; a writer killed with SIGKILL is taken over by the next one once the
    cluster breaks its lock;
  * outages: an OSD stopped under a server with three exports: on-outage=fail answers EIO after
    its timeout, on-outage=wait completes once the OSD is back, the local export keeps serving,
    and everything acknowledged and flushed before is intact, with no restart;
  * scale-out: three servers share one golden image @snap (read-only) and each serves its own
    writable clone; clients verify all of them at once;
  * S3 golden image + ``--overlay``: reads equal the object, writes land in the overlay (the
    object is unchanged), a restart reuses the overlay, another image's overlay is refused, and
    ``qemu-img check`` of the overlay is clean.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import random
import signal
from pathlib import Path

import pytest

from nbdserve.storage.location import RbdLocation, S3Location
from tests.ceph.conftest import MiB, ground_truth_extents
from tests.cephcluster import POOL
from tests.util import merged_map, nbd_connect, qemu_img, run, serve, start_error

pytestmark = pytest.mark.ceph

OBJ = 4 * MiB


def spec(loc: RbdLocation, *extra: str) -> str:
    """nbdserve's spelling of ``loc``: ``rbd:POOL/IMAGE[@SNAP],conf=FILE[,...]``."""
    return ",".join([f"{loc.name},conf={loc.conf}", *extra])


def qemu_rbd(loc: RbdLocation) -> str:
    """QEMU's spelling of ``loc``: ``rbd:POOL/IMAGE[@SNAP]:conf=FILE``."""
    return f"{loc.name}:conf={loc.conf}"


def s3_spec(loc: S3Location, *extra: str) -> str:
    return ",".join([f"{loc.name},endpoint={loc.endpoint}", *extra])


def fill(admin, loc: RbdLocation, rng: random.Random, ranges) -> bytearray:
    """Write random bytes at ``ranges`` through librbd; the whole image as a model."""
    import rbd

    with rbd.Image(admin[1], loc.image) as img:
        model = bytearray(img.size())
        for off, n in ranges:
            data = rng.randbytes(n)
            img.write(data, off)
            model[off : off + n] = data
    return model


def import_image(ceph, local_path, name: str) -> RbdLocation:
    """``rbd import`` a local file (a qcow2, say) as the RBD image ``name``, byte for byte."""
    ceph.rbd("import", str(local_path), f"{POOL}/{name}")
    return RbdLocation(pool=POOL, image=name, conf=str(ceph.conf))


def rbd_bytes(tmp_path, loc: RbdLocation, fmt: str) -> bytes:
    """The disk contents as QEMU's rbd: driver reads them (through format ``fmt``)."""
    out = tmp_path / f"via-qemu-{loc.image}.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", qemu_rbd(loc), out)
    return out.read_bytes()


def make_qcow2_in_rbd(ceph, tmp_path, name: str, size: int, rng: random.Random) -> tuple[RbdLocation, bytearray]:
    """A qcow2 image with some data, made locally by qemu-img/qemu-io, imported into RBD."""
    local = tmp_path / f"{name}.qcow2"
    qemu_img("create", "-f", "qcow2", local, str(size))
    model = bytearray(size)
    cmds = []
    for _ in range(6):
        off, n = rng.randrange(size // 65536) * 65536, rng.randrange(1, 16) * 4096
        n = min(n, size - off)
        pat = rng.randrange(1, 256)
        cmds += ["-c", f"write -P {pat} {off} {n}"]
        model[off : off + n] = bytes([pat]) * n
    run("qemu-io", "-f", "qcow2", *cmds, local)
    return import_image(ceph, local, name), model


# -- bytes and allocation -----------------------------------------------------------------------


def test_qemu_compare_raw_and_qcow2_in_rbd_and_map_equals_object_map(ceph, admin, new_image, tmp_path):
    rng = random.Random(1)
    raw = new_image(40 * MiB)
    fill(admin, raw, rng, [(5, 70000), (9 * MiB + 3, 3 * MiB), (33 * MiB, OBJ)])
    q, _ = make_qcow2_in_rbd(ceph, tmp_path, f"{raw.image}-q", 32 * MiB, rng)
    with serve(tmp_path, "--export", f"raw={spec(raw)}", "--export", f"q={spec(q)}", tcp=True) as srv:
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", qemu_rbd(raw), srv.uri_for("raw"))
        run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", qemu_rbd(q), srv.uri_for("q"))
        info = run("nbdinfo", "--size", srv.uri_for("q")).stdout.strip()
        assert int(info) == 32 * MiB  # the qcow2's virtual size, not the RBD image's
        data = [(off, n) for off, n, kind in merged_map(srv.uri_for("raw")) if kind & 1 == 0]
        assert data == ground_truth_extents(admin, raw) == [(0, OBJ), (2 * OBJ, 2 * OBJ), (8 * OBJ, 2 * OBJ)]


def test_a_qemu_nbd_command_line_serves_qemus_rbd_spelling(admin, new_image, tmp_path):
    """``qemu-nbd -f raw rbd:POOL/IMAGE:conf=FILE``, unchanged, run as nbdserve the qemu-nbd way."""
    loc = new_image(12 * MiB)
    fill(admin, loc, random.Random(2), [(MiB - 7, 3 * MiB)])
    with serve(tmp_path, "-t", "-f", "raw", qemu_rbd(loc), module="nbdserve.qemu_nbd") as srv:
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", qemu_rbd(loc), srv.uri)


def completion_threads(pid: int) -> int:
    """How many librados completion threads (``io_context_pool``) process ``pid`` runs."""
    tasks = Path(f"/proc/{pid}/task")
    return sum((t / "comm").read_text().strip() == "io_context_pool" for t in tasks.iterdir())


def test_one_librados_completion_thread_whatever_ceph_args_say(new_image, tmp_path):
    """The backend's own settings (docs/ceph.md) hold over CEPH_ARGS: here, one completion thread."""
    loc = new_image(4 * MiB)
    with serve(tmp_path, "-f", "raw", spec(loc), env={"CEPH_ARGS": "--librados_thread_count=3"}) as srv:
        assert int(run("nbdinfo", "--size", srv.uri).stdout) == 4 * MiB
        assert completion_threads(srv.pid) == 1


OPS = ("write", "write", "write", "zero", "zero-fast", "trim", "flush")


def workload(h, size: int, rng: random.Random, model: bytearray, count: int) -> None:
    """``count`` seeded requests at unaligned offsets through libnbd ``h``, applied to ``model``."""
    import nbd

    for _ in range(count):
        kind = rng.choice(OPS)
        off = rng.randrange(size - 1)
        n = min(rng.randrange(1, 3 * MiB), size - off)
        if kind == "write":
            data = rng.randbytes(n)
            h.pwrite(data, off)
            model[off : off + n] = data
        elif kind == "flush":
            h.flush()
        elif kind == "trim":
            h.trim(n, off)  # a hint: the model keeps whatever the image reads afterwards
            model[off : off + n] = h.pread(n, off)
        else:
            h.zero(n, off, nbd.CMD_FLAG_NO_HOLE if kind == "zero" else 0)
            model[off : off + n] = bytes(n)
    h.flush()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_seeded_workload_through_nbd_equals_model_through_qemu(ceph, admin, new_image, tmp_path, fmt):
    rng = random.Random(20 + len(fmt))
    if fmt == "raw":
        loc = new_image(24 * MiB)
        model = fill(admin, loc, rng, [(MiB + 1, 2 * MiB), (17 * MiB, OBJ)])
    else:
        loc, model = make_qcow2_in_rbd(ceph, tmp_path, f"wl{rng.randrange(1 << 30)}", 24 * MiB, rng)
    with serve(tmp_path, "--export", f"d={spec(loc, f'format={fmt}')}", export="d") as srv:
        h = nbd_connect(srv.uri)
        try:
            workload(h, len(model), rng, model, 60)
            assert h.pread(len(model), 0) == model
        finally:
            h.shutdown()
    assert rbd_bytes(tmp_path, loc, fmt) == model
    if fmt == "qcow2":
        run("qemu-img", "check", "-f", "qcow2", qemu_rbd(loc))


# -- real clients -------------------------------------------------------------------------------


def fio_verify(uri: str, size: int) -> None:
    """fio's nbd engine: random 4K writes at QD8, then every block read back and checked."""
    out = run(
        "fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", "--iodepth=8",
        f"--size={size}", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
        "--output-format=terse",
    )  # fmt: skip
    assert out.returncode == 0


def nbdcopy_round_trip(tmp_path, uri: str, size: int, seed: int) -> bytes:
    """nbdcopy a random file into the export and the export back out; returns what was written."""
    src, back = tmp_path / f"src{seed}.img", tmp_path / f"back{seed}.img"
    data = random.Random(seed).randbytes(size)
    src.write_bytes(data)
    run("nbdcopy", "--flush", src, uri)
    run("nbdcopy", uri, back)
    assert back.read_bytes() == data
    return data


def test_fio_and_nbdcopy_through_rbd_and_through_s3_with_overlay(ceph, new_image, new_object, s3_env, tmp_path):
    loc = new_image(32 * MiB)
    golden = random.Random(5).randbytes(32 * MiB)
    obj = new_object(golden, chunk=MiB, read_cache=8 * MiB)
    overlay = tmp_path / "s3-overlay.qcow2"
    args = ["--export", f"rbd={spec(loc)}", "--export", f"s3={s3_spec(obj, f'overlay={overlay}', 'format=raw')}"]
    with serve(tmp_path, *args, env=s3_env) as srv:
        # nbdcopy out of the S3 export first: the golden image, untouched.
        out = tmp_path / "golden-out.img"
        run("nbdcopy", srv.uri_for("s3"), out)
        assert out.read_bytes() == golden
        for name in ("rbd", "s3"):
            fio_verify(srv.uri_for(name), 16 * MiB)
            data = nbdcopy_round_trip(tmp_path, srv.uri_for(name), 32 * MiB, seed=len(name))
            if name == "rbd":
                assert rbd_bytes(tmp_path, loc, "raw") == data
    assert hashlib.sha256(bytes(_s3_get(obj))).digest() == hashlib.sha256(golden).digest()  # S3 untouched
    _check_s3_overlay(overlay, obj)


def _s3_get(loc: S3Location) -> bytes:
    import botocore.session

    client = botocore.session.Session().create_client("s3", region_name="us-east-1", endpoint_url=loc.endpoint)
    return client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()


def _check_s3_overlay(overlay, loc: S3Location) -> None:
    """``qemu-img check`` of an overlay over S3 is clean (QEMU cannot open s3:// backings, so it
    checks the overlay alone), and the overlay records the object as its backing."""
    alone = f'json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{overlay}"}},"backing":null}}'
    run("qemu-img", "check", alone)
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", alone).stdout)
    assert info["backing-filename"] == loc.name


# -- locking ------------------------------------------------------------------------------------


def test_second_writer_refused_readers_and_snapshots_served(admin, new_image, tmp_path):
    import rbd

    loc = new_image(8 * MiB)
    with rbd.Image(admin[1], loc.image) as img:
        img.write(b"before", 0)
        img.create_snap("s1")
    snap = RbdLocation(pool=loc.pool, image=loc.image, snap="s1", conf=loc.conf)
    with serve(tmp_path, spec(loc)) as writer:
        h = nbd_connect(writer.uri)
        h.pwrite(b"writer", 0)
        h.flush()
        line = start_error(tmp_path, spec(loc))
        assert "locked by another writer" in line, line
        readers = ["--export", f"head={spec(loc, 'readonly')}", "--export", f"snap={spec(snap)}"]
        with serve(tmp_path, *readers) as reader:
            got = {}
            for name in ("head", "snap"):
                r = nbd_connect(reader.uri_for(name))
                assert r.is_read_only()
                got[name] = r.pread(6, 0)
                r.shutdown()
            assert got == {"head": b"writer", "snap": b"before"}
        h.shutdown()


def test_killed_writer_is_taken_over_by_the_next(ceph, admin, new_image, tmp_path):
    """SIGKILL the serving writer: the next server waits until the cluster expires the dead
    client's watch, breaks its lock and blocklists it, then serves; the acknowledged and flushed
    write of the dead one is there."""
    loc = new_image(8 * MiB)
    with serve(tmp_path, spec(loc), check_stop=False) as first:
        h = nbd_connect(first.uri)
        h.pwrite(b"first", 0)
        h.flush()
        first.stop(signal.SIGKILL)
    with serve(tmp_path, spec(loc)) as second:
        h = nbd_connect(second.uri)
        assert h.pread(5, 0) == b"first"
        h.pwrite(b"second", 0)
        h.flush()
        h.shutdown()
    assert rbd_bytes(tmp_path, loc, "raw")[:6] == b"second"


# -- outages ------------------------------------------------------------------------------------


def test_osd_outage_fail_and_wait_exports_while_a_local_export_serves(ceph, admin, new_image, tmp_path):
    import nbd

    rng = random.Random(9)
    failing, waiting = new_image(16 * MiB), new_image(16 * MiB)
    local = tmp_path / "local.img"
    local.write_bytes(rng.randbytes(4 * MiB))
    args = [
        "--workers", "1",
        "--export", f"fail={spec(failing, 'timeout=2', 'on-outage=fail')}",
        "--export", f"wait={spec(waiting, 'timeout=2', 'on-outage=wait')}",
        "--export", f"local={local},format=raw",
    ]  # fmt: skip
    before = rng.randbytes(MiB)
    with serve(tmp_path, *args) as srv:
        f, w, loc_h = (nbd_connect(srv.uri_for(n)) for n in ("fail", "wait", "local"))
        for h in (f, w):
            h.pwrite(before, 0)
            h.flush()
        ceph.stop_osd()
        try:
            # wait: a read issued now stays pending for as long as the OSD is down.
            buf = nbd.Buffer(MiB)
            cookie = w.aio_pread(buf, 0)
            # fail: EIO once the timeout has passed (a read of an object that exists: librbd
            # answers reads of objects the object map says are missing without an OSD).
            with pytest.raises(nbd.Error) as e:
                f.pread(4096, 0)
            assert e.value.errno == "EIO"
            late = rng.randbytes(65536)
            late_ok = True
            try:
                f.pwrite(late, 4 * MiB)
                f.flush()
            except nbd.Error as err:
                assert err.errno == "EIO"
                late_ok = False
            # the local export answers meanwhile, on the same server process
            assert loc_h.pread(MiB, MiB) == local.read_bytes()[MiB : 2 * MiB]
            w.poll(0)
            assert not w.aio_command_completed(cookie)  # still waiting, past the other's timeout
        finally:
            ceph.start_osd()
            ceph.wait_osd_up()
        while not w.aio_command_completed(cookie):
            w.poll(-1)
        assert buf.to_bytearray() == before
        # the same server, no restart: both exports work again and kept what was flushed
        assert f.pread(MiB, 0) == before and w.pread(MiB, 0) == before
        got = f.pread(65536, 4 * MiB)
        assert got == late or (not late_ok and got == bytes(65536))
        f.pwrite(b"after", 0)
        f.flush()
        for h in (f, w, loc_h):
            h.shutdown()
    assert rbd_bytes(tmp_path, failing, "raw")[:5] == b"after"


# -- scale-out ----------------------------------------------------------------------------------


def test_three_servers_share_a_golden_snapshot_and_each_write_its_own_clone(ceph, admin, new_image, tmp_path):
    import rbd

    rng = random.Random(13)
    golden = new_image(16 * MiB)
    model = fill(admin, golden, rng, [(0, 3 * MiB), (9 * MiB + 5, 2 * MiB)])
    with rbd.Image(admin[1], golden.image) as img:
        img.create_snap("gold")
        img.protect_snap("gold")
    snap = RbdLocation(pool=POOL, image=golden.image, snap="gold", conf=golden.conf)
    clones = []
    for i in range(3):
        clone = RbdLocation(pool=POOL, image=f"{golden.image}-vm{i}", conf=golden.conf)
        rbd.RBD().clone(admin[1], golden.image, "gold", admin[1], clone.image)
        clones.append(clone)
    mine = [rng.randbytes(MiB) for _ in clones]
    with (
        serve(tmp_path, "--export", f"golden={spec(snap)}", "--export", f"vm={spec(clones[0])}") as s0,
        serve(tmp_path, "--export", f"golden={spec(snap)}", "--export", f"vm={spec(clones[1])}") as s1,
        serve(tmp_path, "--export", f"golden={spec(snap)}", "--export", f"vm={spec(clones[2])}") as s2,
    ):
        servers = [s0, s1, s2]

        def client(i: int) -> None:
            g = nbd_connect(servers[i].uri_for("golden"))
            v = nbd_connect(servers[i].uri_for("vm"))
            assert g.is_read_only() and not v.is_read_only()
            assert g.pread(len(model), 0) == model
            v.pwrite(mine[i], 4 * MiB + i)
            v.flush()
            expect = bytearray(model)
            expect[4 * MiB + i : 5 * MiB + i] = mine[i]
            assert v.pread(len(expect), 0) == expect
            g.shutdown()
            v.shutdown()

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            for fut in [pool.submit(client, i) for i in range(3)]:
                fut.result()
    assert rbd_bytes(tmp_path, snap, "raw") == model
    for i, clone in enumerate(clones):
        expect = bytearray(model)
        expect[4 * MiB + i : 5 * MiB + i] = mine[i]
        assert rbd_bytes(tmp_path, clone, "raw") == expect


# -- S3 golden image and overlays ---------------------------------------------------------------


def test_s3_golden_image_with_overlay_restart_reuses_it(ceph, new_object, s3_env, tmp_path):
    golden = random.Random(17).randbytes(12 * MiB + 4096)
    obj = new_object(golden, chunk=MiB, read_cache=4 * MiB)
    other = new_object(b"\x01" * MiB)
    overlay = tmp_path / "vm.qcow2"
    image = s3_spec(obj)
    with serve(tmp_path, image, "--overlay", overlay, "-f", "raw", env=s3_env) as srv:
        h = nbd_connect(srv.uri)
        assert h.get_size() == len(golden)
        assert h.pread(len(golden), 0) == golden
        h.pwrite(b"overlay!" * 512, 3 * MiB + 5)
        h.zero(MiB, 8 * MiB)
        h.flush()
        h.shutdown()
    expect = bytearray(golden)
    expect[3 * MiB + 5 : 3 * MiB + 5 + 4096] = b"overlay!" * 512
    expect[8 * MiB : 9 * MiB] = bytes(MiB)
    assert _s3_get(obj) == golden  # the object never changes
    _check_s3_overlay(overlay, obj)
    with serve(tmp_path, image, "--overlay", overlay, "-f", "raw", env=s3_env) as srv:
        h = nbd_connect(srv.uri)
        assert h.pread(len(expect), 0) == expect
        h.shutdown()
    line = start_error(tmp_path, s3_spec(other), "--overlay", overlay, "-f", "raw", env=s3_env)
    assert "this overlay's backing is" in line and obj.name in line, line
    line = start_error(tmp_path, s3_spec(other), env=s3_env)
    assert "served read-only" in line, line


def test_rbd_overlay_opens_in_qemu_too(ceph, admin, new_image, tmp_path):
    """An overlay over an RBD image records it the way QEMU spells rbd:, so QEMU opens the whole
    chain: ``qemu-img compare`` of the overlay against the export, and a clean check; the RBD
    image is never written (no exclusive lock is taken: another writer may hold it)."""
    rng = random.Random(23)
    loc = new_image(16 * MiB)
    model = fill(admin, loc, rng, [(0, 2 * MiB), (12 * MiB, MiB)])
    overlay = tmp_path / "rbd-overlay.qcow2"
    with serve(tmp_path, spec(loc), "--overlay", overlay) as srv:
        h = nbd_connect(srv.uri)
        h.pwrite(b"\x42" * 70000, MiB - 3)
        h.flush()
        run("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", overlay, srv.uri)
        with serve(tmp_path, spec(loc)) as writer:  # the image's own writer runs meanwhile
            assert writer.alive()
        h.shutdown()
    run("qemu-img", "check", overlay)
    assert rbd_bytes(tmp_path, loc, "raw") == model
