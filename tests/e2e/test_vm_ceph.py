"""A VM on an export whose image lives in Ceph: a qcow2 stored in an RBD image, served by
nbdserve as ``rbd:POOL/IMAGE,conf=...,format=qcow2`` (the qcow2 driver on RbdStorage).

* boot: the root filesystem on the export through QEMU's NBD client;
* attach: the Linux nbd-client in the guest, one connection then ``-C 2`` (multi-conn), mkfs,
  writes, discards.

The image is built locally, ``rbd import``-ed, served from RBD, and ``rbd export``-ed back after
the server stopped; the scenarios' host checks (``qemu-img check``, ``e2fsck``, file contents,
discarded ranges) then run on what the server wrote into RBD.  Marked ``vm`` and ``ceph``: either
``--no-vm`` or ``--no-ceph`` skips them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
from vmkit import server_kind
from vmscenarios import attach_scenario, boot_scenario

from tests.cephcluster import POOL

pytestmark = [pytest.mark.vm, pytest.mark.ceph]

_names = itertools.count()


@pytest.fixture
def in_rbd(ceph) -> Callable[[Path], tuple[str, Callable[[], None]]]:
    """``place`` for the scenarios: the built image goes into a fresh RBD image, byte for byte."""

    def place(image: Path) -> tuple[str, Callable[[], None]]:
        name = f"vm{next(_names)}-{image.stem}"
        ceph.rbd("import", str(image), f"{POOL}/{name}")

        def fetch() -> None:
            image.unlink()
            ceph.rbd("export", f"{POOL}/{name}", str(image))

        if server_kind() == "qemu-nbd":
            return f"rbd:{POOL}/{name}:conf={ceph.conf}", fetch
        return f"rbd:{POOL}/{name},conf={ceph.conf}", fetch

    return place


def test_boot_root_on_qcow2_in_rbd(tmp_path, guest, in_rbd, record_property):
    res = boot_scenario(tmp_path, guest, "qcow2", place=in_rbd)
    assert res.steps == ["root-on-vda", "seed-ok", "write-ok"]
    record_property("vm_seconds", round(res.seconds, 1))


def test_attach_qcow2_in_rbd_with_nbd_client_multi_conn(tmp_path, guest, in_rbd, record_property):
    res = attach_scenario(tmp_path, guest, "qcow2", place=in_rbd)
    assert res.steps == ["connected-1", "fs-1-ok", "pass-1-ok", "connected-2", "pass-2-ok"]
    record_property("vm_seconds", round(res.seconds, 1))
