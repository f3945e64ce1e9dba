"""Large WRITE payloads landed in the image file by splice (``server.landing``), over NBD.

The landing is the WRITE route's case for a payload still arriving once its header is parsed; the
Prometheus counter ``nbdserve_write_spliced_bytes`` shows it was taken.  Shown here, with real
clients over real sockets (Unix and TCP):
  * libnbd writes of 128 KiB to 4 MiB at offsets of every alignment, many in flight at once,
    land byte for byte in raw, in allocated qcow2 and QED clusters and in present VHDX blocks
    (the image equals the model:
    compared by ``qemu-img compare``, checked by ``qemu-img check``; reads through NBD too),
    and qemu-io's writes as well; requests that follow a landed payload on the same connection
    are parsed in step;
  * qcow2: while a payload lands in its clusters, a TRIM of them from another connection waits
    (it would free them, and an allocating write could take them while the payload still
    arrives): the other connection's new data is never overwritten by the landing payload;
  * VHDX likewise: a TRIM of a block a payload is landing in waits, so the payload never lands in
    space the trim already gave back (the block's old place in the file ends up a hole); a write
    smaller than a sector waits for a landing only when it touches the landing's sectors;
  * a file error in the middle of a landing (the server runs under RLIMIT_FSIZE, so the kernel
    refuses writes past that size with EFBIG) answers that request with an error, and the same
    connection goes on serving; the counter does not count it;
  * a client that disconnects inside a payload ends only its connection; one that pauses inside
    it for `--payload-timeout` seconds is cut off, and what its landing held is free again;
  * compact and extended request headers both land (a raw client for the latter);
  * direct I/O (``--cache=none``) and TLS never land (the counter stays 0) and write correctly.
"""

from __future__ import annotations

import contextlib
import errno
import random
import resource
import struct
from pathlib import Path

import nbd
import pytest

from tests.imagetest import check_clean
from tests.interop import nbdclient as raw
from tests.interop.test_metrics import samples, scrape, value
from tests.util import free_port, nbd_connect, qemu_img, qemu_io, serve

MiB = 1 << 20
SIZE = 32 * MiB
OFFSETS = [0, 1, 511, 512 + 7, 4095, 65537, 3 * MiB + 12345, SIZE - 4 * MiB]
LENGTHS = [128 * 1024 + 1, 200_000, MiB, MiB + 3, 4 * MiB - 1]


def spliced(port: int) -> float:
    status, text = scrape(port)
    assert status == 200
    return value(samples(text), "nbdserve_write_spliced_bytes_total", export="")


def image(tmp_path: Path, size: int = SIZE, fmt: str = "raw") -> tuple[Path, bytearray]:
    """An image of random bytes, every cluster allocated."""
    data = bytearray(random.Random(7).randbytes(size))
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    if fmt != "raw":
        out = tmp_path / f"disk.{fmt}"
        qemu_img("convert", "-q", "-f", "raw", "-O", fmt, path, out)
        path.unlink()
        path = out
    return path, data


@pytest.mark.parametrize(
    ("fmt", "tcp"), [("raw", False), ("raw", True), ("qcow2", False), ("qed", False), ("vhdx", False)]
)
def test_large_writes_at_every_alignment_land_exactly(tmp_path, fmt, tcp):
    path, model = image(tmp_path, fmt=fmt)
    port = free_port()
    rng = random.Random(11)
    with serve(tmp_path, "--metrics", f"127.0.0.1:{port}", "-f", fmt, path, tcp=tcp) as srv:
        h = nbd_connect(srv.uri)
        # one at a time, every offset with every length
        for off in OFFSETS:
            for n in LENGTHS:
                if off + n > SIZE:
                    continue
                data = rng.randbytes(n)
                h.pwrite(data, off)
                model[off : off + n] = data
        assert spliced(port) > 0
        # many in flight (disjoint ranges: NBD does not order requests in flight): the socket
        # holds the next requests' headers and payloads behind each landing payload, small
        # writes among them
        taken: list[tuple[int, int]] = []
        cookies = []
        while len(cookies) < 30:
            off = rng.randrange(SIZE - 4 * MiB)
            n = rng.choice([*LENGTHS, 1, 4096, 65536])
            if any(off < end and start < off + n for start, end in taken):
                continue
            taken.append((off, off + n))
            data = rng.randbytes(n)
            cookies.append(h.aio_pwrite(bytearray(data), off))
            model[off : off + n] = data
        while h.aio_in_flight():
            h.poll(-1)
        assert all(h.aio_command_completed(c) for c in cookies)
        h.flush()
        for off in (0, 1, 3 * MiB + 12345):
            assert h.pread(2 * MiB, off) == model[off : off + 2 * MiB]
        h.shutdown()
        # qemu-io, another client: a pattern at an odd offset, read back through NBD
        qemu_io("raw", srv.uri, "write -P 0x5a 1000001 1500000")
        model[1000001 : 1000001 + 1500000] = b"\x5a" * 1500000
        qemu_io("raw", srv.uri, "read -P 0x5a 1000001 1500000")
        landed = spliced(port)
    want = tmp_path / "model.raw"
    want.write_bytes(model)
    if fmt != "raw":
        check_clean(path, fmt)
    qemu_img("compare", "-q", "-f", fmt, "-F", "raw", path, want)
    assert landed >= 1500000  # at least qemu-io's write was landed too (more than its first part)


@pytest.mark.parametrize("extended", [False, True], ids=["compact", "extended"])
def test_raw_client_landings_under_both_header_kinds(tmp_path, extended):
    """Extended headers (which libnbd 1.14 does not speak) carry the payload length in the
    header: landed writes at odd offsets, each followed at once by a READ of what it wrote."""
    path, model = image(tmp_path, 8 * MiB)
    port = free_port()
    rng = random.Random(13)
    with serve(tmp_path, "--metrics", f"127.0.0.1:{port}", "-f", "raw", path) as srv:
        with raw.RawClient(srv.sock) as c:
            c.greet()
            c.go(extended=extended)
            for off, n in ((1, MiB), (4097, 3 * MiB + 5), (7 * MiB - 300_001, 300_000)):
                data = rng.randbytes(n)
                assert c.pwrite(off, data).error == 0
                model[off : off + n] = data
                assert c.pread(off, n) == data
        assert spliced(port) > 0
    assert path.read_bytes() == model


@contextlib.contextmanager
def file_size_limit(limit: int):
    """RLIMIT_FSIZE for the processes started inside (the server inherits it); Python ignores
    SIGXFSZ, so a write past the limit fails with EFBIG instead of killing the writer."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_file_error_inside_a_landing_fails_that_write_only(tmp_path):
    path, model = image(tmp_path, 8 * MiB)
    limit = 4 * MiB
    port = free_port()
    with file_size_limit(limit):
        srv_cm = serve(tmp_path, "--metrics", f"127.0.0.1:{port}", "-f", "raw", path)
        srv = srv_cm.__enter__()
    try:
        h = nbd_connect(srv.uri)
        before = spliced(port)
        for off in (6 * MiB, limit - 300_000):  # wholly past the limit; straddling it
            with pytest.raises(nbd.Error) as ei:
                h.pwrite(bytes(b"\xee" * MiB), off)
            assert ei.value.errnum == errno.ENOSPC  # EFBIG, as NBD has it
        assert spliced(port) == before  # failed landings are not counted
        # the same connection is in step: a landing write below the limit and reads work
        data = random.Random(3).randbytes(MiB)
        h.pwrite(data, 1234)
        model[1234 : 1234 + MiB] = data
        assert h.pread(MiB, 1234) == data
        assert h.pread(4096, 7 * MiB) == model[7 * MiB : 7 * MiB + 4096]  # untouched past the limit
        assert spliced(port) == before + MiB
        h.shutdown()
    finally:
        srv_cm.__exit__(None, None, None)
    got = path.read_bytes()
    assert got[: limit - 300_000] == model[: limit - 300_000]
    assert got[limit:] == model[limit:]


def test_client_gone_inside_a_payload_ends_only_its_connection(tmp_path):
    path, _ = image(tmp_path, 8 * MiB)
    with serve(tmp_path, "-f", "raw", path) as srv:
        other = nbd_connect(srv.uri)
        with raw.RawClient(srv.sock) as c:
            c.greet()
            c.go()
            header = struct.pack(">IHHQQI", raw.REQUEST_MAGIC, 0, raw.CMD_WRITE, 1, 0, 4 * MiB)
            c.send(header + b"\x11" * (700 * 1024))
        data = random.Random(5).randbytes(MiB + 1)
        other.pwrite(data, 2 * MiB + 1)
        assert other.pread(len(data), 2 * MiB + 1) == data
        srv.wait_logged(1, "inside a WRITE payload", witness=lambda: other.pread(512, 0))
        other.shutdown()
        assert srv.alive()


@pytest.mark.parametrize("how", ["direct", "tls"])
def test_no_landing_where_bytes_must_pass_through_memory(tmp_path, how, pki):
    path, model = image(tmp_path, 8 * MiB)
    port = free_port()
    args = ["--cache=none"] if how == "direct" else ["--tls-creds", str(pki.server)]
    with serve(tmp_path, "--metrics", f"127.0.0.1:{port}", *args, "-f", "raw", path) as srv:
        h = nbd.NBD()
        if how == "tls":
            h.set_tls(nbd.TLS_REQUIRE)
            h.set_tls_certificates(str(pki.no_cert))
            h.connect_uri(f"nbds+unix:///?socket={srv.sock}")
        else:
            h.connect_uri(srv.uri)
        data = random.Random(9).randbytes(3 * MiB)
        h.pwrite(data, 4096)
        model[4096 : 4096 + len(data)] = data
        assert h.pread(len(data), 4096) == data
        h.shutdown()
        assert spliced(port) == 0
    assert path.read_bytes() == model


def wait_in_flight(port: int, n: int) -> None:
    """Until the export has ``n`` requests in flight (scraped, bounded)."""
    for _ in range(1000):
        if value(samples(scrape(port)[1]), "nbdserve_requests_in_flight", export="") == n:
            return
    raise AssertionError(f"never {n} requests in flight")


@contextlib.contextmanager
def landing_begun(srv, port: int):
    """A raw client ("A") that sent a 1 MiB WRITE at 0 and 200 KiB of its payload, once the
    server shows it in flight (its landing has begun)."""
    with raw.RawClient(srv.sock) as a:
        a.greet()
        a.go()
        a.request(raw.CMD_WRITE, 1, 0, MiB, payload=b"\xaa" * (200 * 1024))
        wait_in_flight(port, 1)
        yield a


def first_mib_written(tmp_path: Path, fmt: str, options: str) -> Path:
    """A 16 MiB image made by QEMU whose first MiB holds 0x11 (allocated: it can take landings)."""
    img = tmp_path / f"t.{fmt}"
    qemu_img("create", "-q", "-f", fmt, "-o", options, img, str(16 * MiB))
    qemu_io(fmt, img, "write -P 0x11 0 1M")
    return img


def test_qcow2_trim_waits_for_a_landing_in_its_clusters(tmp_path):
    """Connection A sends a 1 MiB WRITE to allocated clusters and stops inside the payload (the
    landing has begun: the export shows one request in flight); B trims those clusters; C writes
    new data to unallocated clusters (an allocation, which would take freed clusters first).
    Then A sends the rest.  C's data must be intact and the image consistent: B's trim waited for
    A's landing, so the clusters A was landing in were never C's."""
    img = first_mib_written(tmp_path, "qcow2", "cluster_size=65536")
    port = free_port()
    with serve(tmp_path, "--metrics", f"127.0.0.1:{port}", "-f", "qcow2", img) as srv:
        b, c = nbd_connect(srv.uri), nbd_connect(srv.uri)
        assert b.pread(512, 0) == b"\x11" * 512  # the L2 table cached: the clusters can take a landing
        with landing_begun(srv, port) as a:
            trim = b.aio_trim(MiB, 0)
            wait_in_flight(port, 2)  # and B's trim is waiting
            new = random.Random(4).randbytes(MiB)
            c.pwrite(new, 8 * MiB)  # allocates while A's clusters are still being landed
            assert not b.aio_command_completed(trim)
            a.send(b"\xaa" * (MiB - 200 * 1024))
            assert a.reply().error == 0
            while b.aio_in_flight():
                b.poll(-1)
            assert b.aio_command_completed(trim)
            assert c.pread(MiB, 8 * MiB) == new
            assert c.pread(MiB, 0) == bytes(MiB)  # the trim ran after the landing
        assert spliced(port) == MiB
        b.shutdown()
        c.shutdown()
    check_clean(img, "qcow2")
    qemu_io("qcow2", img, f"read -P 0 0 {MiB}")
    out = qemu_io("qcow2", img, f"read -v {8 * MiB} 16").stdout
    assert " ".join(f"{x:02x}" for x in new[:16]) in out


def test_vhdx_trim_waits_for_a_landing_in_its_block(tmp_path):
    img = first_mib_written(tmp_path, "vhdx", "block_size=1M")
    host = img.read_bytes().find(b"\x11" * MiB)  # the block's place in the file (QEMU maps no VHDX offsets)
    assert host > 0
    port = free_port()
    with serve(tmp_path, "--metrics", f"127.0.0.1:{port}", "-f", "vhdx", img) as srv:
        b = nbd_connect(srv.uri)
        b.pwrite(b"\x22", 4 * MiB)  # this session's header is written: present blocks take landings
        with landing_begun(srv, port) as a:
            trim = b.aio_trim(MiB, 0)
            wait_in_flight(port, 2)  # and B's trim is waiting
            a.send(b"\xaa" * (MiB - 200 * 1024))
            assert a.reply().error == 0
            while b.aio_in_flight():
                b.poll(-1)
            assert b.aio_command_completed(trim)
            assert b.pread(MiB, 0) == bytes(MiB)
        assert spliced(port) == MiB
        b.shutdown()
    with open(img, "rb") as f:
        f.seek(host)
        assert f.read(MiB) == bytes(MiB)  # punched after the landing, not landed in after the punch
    check_clean(img, "vhdx")


def test_vhdx_unaligned_writes_wait_for_a_landing_only_over_its_sectors(tmp_path):
    """A pauses inside a payload landing in a VHDX block (512-byte sectors: the image layer's
    range lock holds the landing's sectors shared).  B's write of 100 bytes inside A's range is a
    read-modify-write of those sectors: it waits for A.  C's write of 100 bytes elsewhere is one
    too, of other sectors: it completes while A still pauses (with one lock for the whole image it
    waited for --payload-timeout).  Then A sends the rest; B's bytes are over A's."""
    img = first_mib_written(tmp_path, "vhdx", "block_size=1M")
    port = free_port()
    with serve(tmp_path, "--metrics", f"127.0.0.1:{port}", "-f", "vhdx", img) as srv:
        b, c = nbd_connect(srv.uri), nbd_connect(srv.uri)
        b.pwrite(b"\x22", 4 * MiB)  # this session's header is written: present blocks take landings
        with landing_begun(srv, port) as a:
            inside = b.aio_pwrite(b"\xbb" * 100, 1000)
            wait_in_flight(port, 2)  # B's write is waiting
            elsewhere = c.aio_pwrite(b"\xcc" * 100, 8 * MiB + 3)
            for _ in range(100):  # bounded: the old lock held it for the payload timeout (30 s)
                if c.aio_command_completed(elsewhere):
                    break
                c.poll(100)
            else:
                raise AssertionError("a write to other sectors waited for the paused landing")
            assert not b.aio_command_completed(inside)
            a.send(b"\xaa" * (MiB - 200 * 1024))
            assert a.reply().error == 0
            while b.aio_in_flight():
                b.poll(-1)
            assert b.aio_command_completed(inside)
        assert spliced(port) == MiB
        expect = bytearray(b"\xaa" * MiB)
        expect[1000:1100] = b"\xbb" * 100
        assert b.pread(MiB, 0) == expect
        assert c.pread(106, 8 * MiB) == b"\0" * 3 + b"\xcc" * 100 + b"\0" * 3
        b.shutdown()
        c.shutdown()
    check_clean(img, "vhdx")
    qemu_io("vhdx", img, "read -P 0xaa 0 1000", "read -P 0xbb 1000 100", f"read -P 0xaa 1100 {MiB - 1100}")
    qemu_io("vhdx", img, f"read -P 0 {8 * MiB} 3", f"read -P 0xcc {8 * MiB + 3} 100", f"read -P 0 {8 * MiB + 103} 3")


def test_client_pausing_inside_a_landing_is_cut_off_and_its_range_freed(tmp_path):
    """--payload-timeout: A stops inside a payload landing in qcow2 clusters; B's trim of them
    waits, A is cut off after the timeout (one log line), and B's trim then completes."""
    img = first_mib_written(tmp_path, "qcow2", "cluster_size=65536")
    port = free_port()
    with serve(tmp_path, "--metrics", f"127.0.0.1:{port}", "--payload-timeout", "1", "-f", "qcow2", img) as srv:
        b = nbd_connect(srv.uri)
        assert b.pread(512, 0) == b"\x11" * 512
        with landing_begun(srv, port) as a:
            trim = b.aio_trim(MiB, 0)
            assert a.wait_closed(timeout=30)
        while b.aio_in_flight():
            b.poll(-1)
        assert b.aio_command_completed(trim)
        assert b.pread(MiB, 0) == bytes(MiB)
        assert srv.log_lines("no byte of a WRITE payload for 1 s")
        b.shutdown()
    check_clean(img, "qcow2")
