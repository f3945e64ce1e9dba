"""The Linux kernel NBD client (nbd.ko + nbd-client) attaches an nbdserve export, 1 and 2 connections."""

from __future__ import annotations

import pytest
from vmscenarios import attach_scenario

pytestmark = pytest.mark.vm


def test_attach_with_nbd_client(tmp_path, guest, fmt, record_property):
    res = attach_scenario(tmp_path, guest, fmt)
    assert res.steps == ["connected-1", "fs-1-ok", "pass-1-ok", "connected-2", "pass-2-ok"]
    record_property("vm_seconds", round(res.seconds, 1))
    record_property("guest_step_uptimes", res.times)
