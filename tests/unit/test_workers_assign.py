"""The export-to-worker assignment and the number of workers (``nbdserve/server/workers.py``,
``ServerConfig.worker_count``): pins first, then balanced in configuration order; a reload keeps
every export where it was."""

from __future__ import annotations

import os

from nbdserve.config import ExportConfig, ServerConfig
from nbdserve.server.workers import assign


def exports(*pins: int | None) -> tuple[ExportConfig, ...]:
    return tuple(ExportConfig(name=f"e{i}", path=f"/x/{i}", worker=p) for i, p in enumerate(pins))


def test_pins_first_then_the_least_loaded_in_order() -> None:
    assert assign(exports(None, None, None, None), 2) == {"e0": 0, "e1": 1, "e2": 0, "e3": 1}
    assert assign(exports(None, 0, None, 0, None), 3) == {"e1": 0, "e3": 0, "e0": 1, "e2": 2, "e4": 1}
    assert assign(exports(1, 1, 1), 2) == {"e0": 1, "e1": 1, "e2": 1}  # pins win over balance


def test_a_reload_moves_no_export() -> None:
    before = assign(exports(None, None, None), 2)  # e0 -> 0, e1 -> 1, e2 -> 0
    grown = (*exports(None, None, None), ExportConfig(name="new", path="/x/new"))
    after = assign(grown[1:], 2, before)  # e0 removed: e1, e2 stay; the new one balances
    assert after == {"e1": 1, "e2": 0, "new": 0}
    assert assign(exports(1, None, None), 2, before)["e0"] == 0  # a changed pin waits for a restart


def test_worker_count() -> None:
    cores = os.cpu_count() or 1
    assert ServerConfig(exports=exports(None)).worker_count() == 1
    assert ServerConfig(exports=exports(*[None] * 64)).worker_count() == min(cores, 64)
    assert ServerConfig(exports=exports(None, None), workers=8).worker_count() == 2  # at most one per export
    assert ServerConfig(exports=exports(None, 5)).worker_count() == max(min(cores, 2), 6)  # covers the pin
    assert ServerConfig(exports=exports(None, None), oneshot=True).worker_count() == 1
    assert ServerConfig(exports=exports(None, None), workers=1).worker_count() == 1


def test_exports_of_one_file_share_a_worker(tmp_path) -> None:
    img = tmp_path / "one.img"
    img.write_bytes(b"")
    link = tmp_path / "link.img"
    link.symlink_to(img)
    e = (
        ExportConfig(name="a", path=str(img)),
        ExportConfig(name="b", path=str(tmp_path / "other.img")),
        ExportConfig(name="c", path=str(link)),  # the same file as a, by another name
    )
    assert assign(e, 2) == {"a": 0, "b": 1, "c": 0}
