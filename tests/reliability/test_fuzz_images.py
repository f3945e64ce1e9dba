"""Image mutation fuzzing, per format: QEMU-made images with their headers and tables mutated,
opened read-write through the image layer and used (reads, writes, zeroes, trims, block status at
unaligned offsets, flush, close).

Each case must end in one of: a clean run, or one-line ``ImageError`` (``CorruptImage``,
``UnsupportedImage``) / ``NbdError`` failures, at open or at any request.  Any other exception,
a multi-line message, a case that does not finish within ``CASE_LIMIT`` seconds (SIGALRM
interrupts it) or one that allocates more than ``MEMORY_LIMIT`` bytes at its peak (tracemalloc)
fails the test, naming the case's seed so it can be replayed alone (``FUZZ_CASE=fmt:seed``).

Mutations target the structures a driver trusts: the header, the tables (qcow2 L1/L2/refcounts,
QED L1/L2, VHD BAT and bitmaps, VHDX BAT and metadata, VMDK descriptor, grain directories and
tables, VDI block map), backing file names, the VHDX log and region tables, and the file's
length.  Checksummed structures (VHD footer and dynamic header, VHDX headers and region tables) get
their checksums fixed for half of the cases, so the mutation reaches the code behind the check.

Default: ``CASES`` per format; ``NBDSERVE_SLOW=1`` runs ``SLOW_CASES``.  The summary line per
format (``-s`` shows it) is the figure RELIABILITY.md quotes.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import struct
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from nbdserve.cache import ClusterCache
from nbdserve.errors import ImageError, NbdError
from nbdserve.image import ImageSpec, open_image
from nbdserve.storage.base import settled
from tests import vhdgen, vhdxgen
from tests.conftest import SLOW
from tests.util import qemu_img, qemu_io

MiB = 1 << 20
SIZE = 8 * MiB
CASES = 40
SLOW_CASES = 2000
CASE_LIMIT = 30  # seconds: a case still running then is a hang
MEMORY_LIMIT = 96 << 20  # peak bytes allocated by one case (the cache budget is 8 MiB)
FORMATS = ("raw", "qcow2", "qed", "vpc", "vhdx", "vmdk", "vdi")
FILL = ["write -P 0xab 0 64k", "write -P 0xcd 100k 4k", "write -P 0x11 3M 1M", "write -z 5M 128k", "write -P 7 7M 512"]


# -- the seed images and where their structures are ---------------------------------------------


def make_seed(d: Path, fmt: str) -> Path:
    """A QEMU-made image of ``fmt`` (qcow2 and QED over a raw backing file in ``d``)."""
    path = d / f"seed.{fmt}"
    if fmt in ("qcow2", "qed"):
        base = d / "base.raw"
        if not base.exists():
            qemu_img("create", "-q", "-f", "raw", base, str(SIZE))
            qemu_io("raw", base, "write -P 0x5e 2M 2M")
        opts = ["-o", "cluster_size=4096"] if fmt == "qcow2" else ["-o", "cluster_size=4096,table_size=2"]
        qemu_img("create", "-q", "-f", fmt, *opts, "-b", base.name, "-F", "raw", path, str(SIZE))
    elif fmt == "vhdx":
        qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, str(SIZE))
    elif fmt == "vpc":
        qemu_img("create", "-q", "-f", "vpc", "-o", "force_size=on", path, str(SIZE))
    else:  # raw; vmdk (monolithicSparse) and vdi (dynamic) as qemu-img makes them by default
        qemu_img("create", "-q", "-f", fmt, path, str(SIZE))
    qemu_io(fmt, path, *FILL)
    return path


def regions(fmt: str, data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of the metadata structures of a seed image, read from its headers."""
    out = [(0, 512)]
    n = len(data)

    def add(off: int, length: int) -> None:
        if 0 <= off < n and length > 0:
            out.append((off, min(length, n - off)))

    if fmt == "qcow2":
        cluster = 1 << struct.unpack_from(">I", data, 20)[0]
        l1_size, l1_off, rt_off, rt_clusters = struct.unpack_from(">IQQI", data, 36)
        add(l1_off, l1_size * 8)
        add(rt_off, rt_clusters * cluster)
        add(struct.unpack_from(">Q", data, rt_off)[0], cluster)
        for i in range(l1_size):
            add(struct.unpack_from(">Q", data, l1_off + 8 * i)[0] & 0x00FFFFFFFFFFFE00, cluster)
    elif fmt == "qed":
        cluster, table, header = struct.unpack_from("<III", data, 4)
        l1_off = struct.unpack_from("<Q", data, 40)[0]
        add(0, header * cluster)
        add(l1_off, table * cluster)
        for i in range(table * cluster // 8):
            add(struct.unpack_from("<Q", data, l1_off + 8 * i)[0], table * cluster)
    elif fmt == "vpc":
        add(512, 1024)
        bat_off = struct.unpack_from(">Q", data, 512 + 16)[0]
        entries = struct.unpack_from(">I", data, 512 + 28)[0]
        add(bat_off, entries * 4)
        for i in range(entries):
            sector = struct.unpack_from(">I", data, bat_off + 4 * i)[0]
            if sector != 0xFFFFFFFF:
                add(sector * 512, 512)
        add(n - 512, 512)
    elif fmt == "vmdk":  # a monolithicSparse extent: header, descriptor, grain directories, tables
        desc_off, desc_size, per_gt, rgd, gd = struct.unpack_from("<QQIQQ", data, 28)
        capacity, grain = struct.unpack_from("<QQ", data, 12)
        gd_entries = -(-capacity // grain // per_gt)
        add(desc_off * 512, desc_size * 512)
        for table in (rgd, gd):
            add(table * 512, gd_entries * 4)
            for i in range(gd_entries):
                add(struct.unpack_from("<I", data, table * 512 + 4 * i)[0] * 512, per_gt * 4)
    elif fmt == "vdi":  # header, block map
        bmap = struct.unpack_from("<I", data, 340)[0]
        blocks = struct.unpack_from("<I", data, 384)[0]
        add(bmap, blocks * 4)
    elif fmt == "vhdx":
        for off in (64 << 10, 128 << 10):  # headers; the log they name
            add(off, 4096)
            log_length, log_off = struct.unpack_from("<IQ", data, off + 68)
            add(log_off, min(log_length, 8192))
        for off in (192 << 10, 256 << 10):  # region tables; the regions they name
            add(off, 4096)
            count = struct.unpack_from("<I", data, off + 8)[0]
            for i in range(min(count, 16)):
                r_off, r_len = struct.unpack_from("<QI", data, off + 16 + 32 * i + 16)
                add(r_off, min(r_len, 64 << 10))
    return out


# -- mutation --------------------------------------------------------------------------------------

INTERESTING = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x1FF, 0x200, 0x1000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000)
INTERESTING += (0xFFFFFFFF, 1 << 32, 1 << 40, 1 << 48, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)
MAGICS = (b"QFI\xfb\0\0\0\x03", b"QFI\xfb\0\0\0\x01", b"QED\0", b"conectix", b"vhdxfile", b"KDMV", b"LUKS\xba\xbe")


def mutate(rng: random.Random, fmt: str, data: bytes, where: list[tuple[int, int]]) -> tuple[bytearray, list[str]]:
    """1..4 mutations of ``data`` inside ``where`` (and, sometimes, of its length)."""
    buf, log = bytearray(data), []
    for _ in range(rng.randint(1, 4)):
        start, length = rng.choice(where)
        pos = start + rng.randrange(length)
        op = rng.randrange(7)
        if pos >= len(buf):
            continue  # cut off by an earlier mutation
        if op == 6:  # another format's magic over this one's: format confusion
            magic = rng.choice(MAGICS)
            buf[: len(magic)] = magic
            log.append(f"magic {magic!r}")
        elif op == 0:
            bit = rng.randrange(8)
            buf[pos] ^= 1 << bit
            log.append(f"flip {pos:#x}.{bit}")
        elif op == 1:
            buf[pos] = rng.choice((0, 0xFF, rng.randrange(256)))
            log.append(f"byte {pos:#x}={buf[pos]:#x}")
        elif op in (2, 3):
            width = rng.choice((2, 4, 8))
            pos &= ~(width - 1)
            value = rng.choice((*INTERESTING, len(buf), len(buf) - 512, len(buf) + 4096, SIZE, rng.getrandbits(64)))
            value &= (1 << (8 * width)) - 1
            if pos + width <= len(buf):
                buf[pos : pos + width] = value.to_bytes(width, rng.choice(("big", "little")))
                log.append(f"u{8 * width} {pos:#x}={value:#x}")
        elif op == 4:
            src = rng.randrange(max(1, len(buf) - 64))
            n = rng.randint(8, 64)
            buf[pos : pos + n] = data[src : src + n]
            log.append(f"copy {src:#x}+{n}->{pos:#x}")
        else:
            n = len(buf)
            cut = max(0, rng.choice((rng.randrange(n), n - rng.randint(1, 4096), n + rng.randint(1, 8192))))
            buf = buf[:cut] if cut <= len(buf) else buf + bytes(cut - len(buf))
            log.append(f"length={cut}")
    if rng.random() < 0.5:
        fix_checksums(fmt, buf)
        log.append("checksums fixed")
    return buf, log


def fix_checksums(fmt: str, buf: bytearray) -> None:
    if fmt == "vpc" and len(buf) >= 1536:
        vhdgen.fix_checksums(buf)
    elif fmt == "vhdx":
        for off, size in ((64 << 10, 4096), (128 << 10, 4096), (192 << 10, 64 << 10), (256 << 10, 64 << 10)):
            if off + size <= len(buf):
                part = buf[off : off + size]
                vhdxgen.crc_fill(part, 4)
                buf[off : off + size] = part


# -- one case ----------------------------------------------------------------------------------------


class Hang(BaseException):
    """Raised by SIGALRM inside a case that ran longer than CASE_LIMIT."""


def _alarm(signum, frame):
    raise Hang


async def exercise(path: Path, fmt: str, rng: random.Random) -> list[str]:
    """Open and use one image; the one-line errors met, in order (any other exception escapes)."""
    errors: list[str] = []

    def note(exc: Exception) -> None:
        text = str(exc)
        assert "\n" not in text, f"multi-line message: {text!r}"
        errors.append(f"{type(exc).__name__}: {text}")

    try:
        img = await open_image(ImageSpec(str(path), format=rng.choice((fmt, None))), ClusterCache(8 << 20))
    except ImageError as e:
        note(e)
        return errors
    try:
        size = img.size
        span = min(size, 2 * SIZE)
        for _ in range(rng.randint(4, 16) if size else 0):
            near_end = rng.random() < 0.2
            off = max(0, size - rng.randint(1, 65536)) if near_end else rng.randrange(span)
            n = max(1, min(rng.choice((1, 511, 512, 4096, 65536, rng.randint(1, 300000))), size - off))
            kind = rng.choice(("read", "read", "write", "zero", "trim", "status", "flush"))
            if img.readonly and kind in ("write", "zero", "trim"):
                kind = "read"
            try:
                if kind == "read":
                    await settled(img.read(off, memoryview(bytearray(n))))
                elif kind == "write":
                    await settled(img.write(off, memoryview(rng.randbytes(n)), fua=rng.random() < 0.2))
                elif kind == "zero":
                    await img.write_zeroes(off, n, may_trim=rng.random() < 0.5, fast=False, fua=False)
                elif kind == "trim":
                    await img.trim(off, n, fua=False)
                elif kind == "status":
                    await img.runs(off, n, limit=64)
                else:
                    await img.flush()
            except (ImageError, NbdError) as e:
                note(e)
    finally:
        try:
            await img.close()
        except (ImageError, NbdError) as e:
            note(e)
    return errors


def run_case(work: Path, fmt: str, seed_data: bytes, where, case: int) -> tuple[str, int]:
    """One mutated image through ``exercise``: (outcome, peak bytes).  Raises on a finding."""
    rng = random.Random(f"{fmt}:{case}")
    data, mutations = mutate(rng, fmt, seed_data, where)
    path = work / f"case.{fmt}"
    path.write_bytes(data)
    loop = asyncio.new_event_loop()
    tracemalloc.reset_peak()
    signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT)
    try:
        errors = loop.run_until_complete(exercise(path, fmt, rng))
    except Hang:
        raise AssertionError(f"{fmt} case {case} ({'; '.join(mutations)}) did not finish in {CASE_LIMIT}s") from None
    except BaseException as e:
        raise AssertionError(f"{fmt} case {case} ({'; '.join(mutations)}) raised {type(e).__name__}: {e}") from e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        loop.close()
        path.unlink()
    peak = tracemalloc.get_traced_memory()[1]
    assert peak <= MEMORY_LIMIT, f"{fmt} case {case} ({'; '.join(mutations)}) allocated {peak >> 20} MiB"
    if not errors:
        return "clean", peak
    at_open = len(errors) == 1 and errors[0].startswith(("ImageError", "CorruptImage", "Unsupported"))
    return ("refused at open" if at_open else "request errors"), peak


@pytest.fixture
def alarm():
    old = signal.signal(signal.SIGALRM, _alarm)
    tracemalloc.start()
    yield
    tracemalloc.stop()
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("fmt", FORMATS)
def test_mutated_images_fail_cleanly(tmp_path, fmt, alarm):
    seed = make_seed(tmp_path, fmt)
    data = seed.read_bytes()
    where = regions(fmt, data)
    only = os.environ.get("FUZZ_CASE", "")
    if only:
        want_fmt, _, n = only.partition(":")
        if want_fmt != fmt:
            pytest.skip(f"FUZZ_CASE={only}")
        cases = [int(n)]
    else:
        cases = range(SLOW_CASES if SLOW else CASES)
    outcomes: Counter[str] = Counter()
    peak = 0
    for case in cases:
        outcome, p = run_case(tmp_path, fmt, data, where, case)
        outcomes[outcome] += 1
        peak = max(peak, p)
    summary = ", ".join(f"{v} {k}" for k, v in sorted(outcomes.items()))
    print(f"\nfuzz image {fmt}: {len(cases)} cases ({summary}); 0 crashes, 0 hangs; peak {peak / MiB:.1f} MiB")
