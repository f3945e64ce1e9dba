"""nbdserve attaches an image to the guest's own kernel NBD driver, as qemu-nbd does: ``-c /dev/nbd0``,
mount, write, unmount, ``-d`` (then the server exits and the image is checked on the host)."""

from __future__ import annotations

import pytest
from vmscenarios import connect_scenario

pytestmark = pytest.mark.vm


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_connect_and_disconnect_in_a_vm(tmp_path, guest, fmt, record_property):
    res = connect_scenario(tmp_path, guest, fmt)
    assert res.steps == ["connected", "seed-ok", "fs-ok", "disconnected"]
    record_property("vm_seconds", round(res.seconds, 1))
