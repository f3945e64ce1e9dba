"""A VM boots with its root filesystem on an nbdserve export, through QEMU's own NBD client."""

from __future__ import annotations

import pytest
from vmscenarios import boot_scenario

pytestmark = pytest.mark.vm


def test_boot_root_on_export(tmp_path, guest, fmt, record_property):
    res = boot_scenario(tmp_path, guest, fmt)
    assert res.steps == ["root-on-vda", "seed-ok", "write-ok"]
    record_property("vm_seconds", round(res.seconds, 1))
    record_property("guest_step_uptimes", res.times)
