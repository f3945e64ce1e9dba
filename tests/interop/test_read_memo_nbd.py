"""The mapping memo over a real socket: libnbd reads a granule hot (the server's fast path fills
the memo), the granule's mapping then moves or goes away (copy-on-write from an internal qcow2
snapshot, TRIM, WRITE_ZEROES, each then partly rewritten), and the next hot reads of it, 4 KiB and 1 MiB, see the new
contents.  Afterwards QEMU checks the file and compares it with the model.  (The in-process
counterpart, with mutation checks, is ``tests/unit/test_read_memo.py``.)"""

from __future__ import annotations

import pytest

from tests.imagetest import check_clean, compare_with_model
from tests.util import nbd_connect, qemu_img, qemu_io, serve

K, M = 1 << 10, 1 << 20
SIZE = 8 * M

# (format, create options, internal snapshot, change)
CASES = {
    "qcow2-snapshot-write": ("qcow2", ["-o", "cluster_size=4k"], True, "write"),
    "qcow2-trim": ("qcow2", ["-o", "cluster_size=4k"], False, "trim"),
    "qcow2-zero": ("qcow2", ["-o", "cluster_size=4k"], False, "zero"),
    "vhdx-trim": ("vhdx", ["-o", "block_size=1M"], False, "trim"),
    "vhdx-zero": ("vhdx", ["-o", "block_size=1M"], False, "zero"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hot_reads_after_a_mapping_change(tmp_path, case):
    fmt, opts, snapshot, change = CASES[case]
    img = tmp_path / f"m.{fmt}"
    qemu_img("create", "-q", "-f", fmt, *opts, img, str(SIZE))
    qemu_io(fmt, img, f"write -P 0x11 0 {SIZE}")
    if snapshot:
        qemu_img("snapshot", "-c", "s1", img)
    model = bytearray(b"\x11" * SIZE)
    at = 2 * M
    with serve(tmp_path, "-f", fmt, img) as srv:
        h = nbd_connect(srv.uri)
        for _ in range(2):  # the second read is served from the memo
            assert h.pread(4 * K, at) == model[at : at + 4 * K]
            assert h.pread(M, at) == model[at : at + M]
        if change == "write":  # every cluster is shared with s1: the write relocates them
            h.pwrite(b"\x22" * M, at)
            model[at : at + M] = b"\x22" * M
        elif change == "zero":  # then new data goes where the old mapping was
            h.zero(M, at)
            h.pwrite(b"\x33" * (4 * K), at)
            model[at : at + M] = b"\x33" * (4 * K) + bytes(M - 4 * K)
        else:  # TRIM frees the clusters / the block; rewrite part of it to know its contents
            h.trim(M, at)
            h.pwrite(b"\x33" * (4 * K), at)
            model[at : at + M] = h.pread(M, at)
            assert model[at : at + 4 * K] == b"\x33" * (4 * K)
        for _ in range(2):
            assert h.pread(4 * K, at) == model[at : at + 4 * K]
            assert h.pread(M, at) == model[at : at + M]
        h.flush()
        h.shutdown()
    check_clean(img, fmt)
    compare_with_model(img, model, tmp_path, fmt)
