"""libnbd's command-line tools against nbdserve: nbdinfo (list, JSON, map, every --can/--is) and
nbdcopy (multi-connection copies both ways).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.interop.conftest import SIZE, MiB, random_raw, write_sparse_raw
from tests.util import merged_map, qemu_nbd, run, serve

CAN = ("cache", "df", "fast-zero", "flush", "fua", "multi-conn", "trim", "write", "zero")
WRITE_ONLY = {"fast-zero", "trim", "write", "zero"}


def test_nbdinfo_list_several_exports(tmp_path: Path) -> None:
    a = write_sparse_raw(tmp_path / "a.img")
    b = write_sparse_raw(tmp_path / "b.img", size=3 * MiB, runs=())
    c = write_sparse_raw(tmp_path / "c.img", size=1 * MiB, runs=((0, 512, 1),))
    with serve(
        tmp_path,
        "--export",
        f"disk-a={a},format=raw,description=first",
        "--export",
        f"disk-b={b},format=raw,readonly",
        "--export",
        f"disk/c={c},format=raw,description=third one",
    ) as srv:
        text = run("nbdinfo", "--list", srv.uri).stdout
        doc = json.loads(run("nbdinfo", "--list", "--json", srv.uri).stdout)
    for name in ("disk-a", "disk-b", "disk/c"):
        assert f'export="{name}"' in text
    exports = {e["export-name"]: e for e in doc["exports"]}
    assert set(exports) == {"disk-a", "disk-b", "disk/c"}
    assert exports["disk-a"]["description"] == "first"
    assert exports["disk/c"]["description"] == "third one"
    assert "description" not in exports["disk-b"]
    assert [exports[n]["export-size"] for n in ("disk-a", "disk-b", "disk/c")] == [SIZE, 3 * MiB, 1 * MiB]
    assert exports["disk-b"]["is_read_only"] is True
    assert exports["disk-a"]["is_read_only"] is False


def test_nbdinfo_json(served) -> None:
    doc = json.loads(run("nbdinfo", "--json", served.uri).stdout)
    assert doc["protocol"] == "newstyle-fixed"
    assert doc["TLS"] is False
    (e,) = doc["exports"]
    assert e["export-name"] == served.export
    assert e["export-size"] == SIZE
    assert e["is_read_only"] is False
    assert e["is_rotational"] is False
    for flag in ("can_cache", "can_df", "can_fast_zero", "can_flush", "can_fua", "can_multi_conn"):
        assert e[flag] is True, flag
    assert e["block_size_minimum"] == 1
    assert e["block_size_preferred"] == 4096
    assert e["block_size_maximum"] == 32 * MiB
    assert set(e["contexts"]) == {"base:allocation", "qemu:allocation-depth"}


def test_nbdinfo_map_equals_qemu_nbd(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "map.img")
    with serve(tmp_path, "-f", "raw", "-r", img) as ours:
        got = merged_map(ours.uri)
        got_depth = merged_map(ours.uri, "qemu:allocation-depth")
    with qemu_nbd(tmp_path, img, "raw", "-r", "-A") as oracle:
        want = merged_map(oracle.uri)
        want_depth = merged_map(oracle.uri, "qemu:allocation-depth")
    assert got == want
    assert {t for _, _, t in got} == {0, 3}
    assert got_depth == want_depth


def has_structured_reply(uri: str) -> int:
    """Exit status of ``nbdinfo --has structured-reply`` (``--can`` before libnbd 1.16)."""
    p = run("nbdinfo", "--has", "structured-reply", uri, check=False)
    if "unrecognized option" in p.stderr:
        p = run("nbdinfo", "--can", "structured-reply", uri, check=False)
    return p.returncode


@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
def test_nbdinfo_can_and_is(tmp_path: Path, readonly: bool) -> None:
    img = write_sparse_raw(tmp_path / "disk.img")
    with serve(tmp_path, "-f", "raw", *(["-r"] if readonly else []), img) as srv:
        for what in CAN:
            rc = run("nbdinfo", "--can", what, srv.uri, check=False).returncode
            assert rc == (2 if readonly and what in WRITE_ONLY else 0), (what, rc)
        assert has_structured_reply(srv.uri) == 0
        assert run("nbdinfo", "--can", "connect", srv.uri, check=False).returncode == 0
        assert run("nbdinfo", "--is", "read-only", srv.uri, check=False).returncode == (0 if readonly else 2)
        assert run("nbdinfo", "--is", "rotational", srv.uri, check=False).returncode == 2
        assert run("nbdinfo", "--is", "tls", srv.uri, check=False).returncode == 2


def test_nbdcopy_multi_conn_both_ways(tmp_path: Path) -> None:
    src = random_raw(tmp_path / "src.img", 24 * MiB, seed=3)
    with open(src, "r+b") as f:  # holes for nbdcopy's extent-driven sparse copy
        f.seek(4 * MiB)
        f.write(bytes(6 * MiB))
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(24 * MiB)
    back = tmp_path / "back.img"
    with serve(tmp_path, "-v", "-f", "raw", target) as srv:
        run("nbdcopy", "-C", "4", "-T", "4", "--requests=16", src, srv.uri)
        run("nbdcopy", "-C", "4", "-T", "4", "--requests=16", srv.uri, back)
        log = srv.log_text()
    assert run("cmp", src, target, check=False).returncode == 0
    assert run("cmp", src, back, check=False).returncode == 0
    # Each nbdcopy opened four connections to the export (CAN_MULTI_CONN is advertised).
    assert log.count("serving export") >= 8, log
