"""A VM boots with its root filesystem on an nbdserve export, through QEMU's own NBD client."""

from __future__ import annotations

import pytest
from vmscenarios import boot_scenario

from tests.tlscerts import Pki

pytestmark = pytest.mark.vm


def test_boot_root_on_export(tmp_path, guest, fmt, record_property):
    res = boot_scenario(tmp_path, guest, fmt)
    assert res.steps == ["root-on-vda", "seed-ok", "write-ok"]
    record_property("vm_seconds", round(res.seconds, 1))
    record_property("guest_step_uptimes", res.times)


def test_boot_root_over_tls(tmp_path, tmp_path_factory, guest, record_property):
    """QEMU's NBD client with tls-creds (and a client certificate, which the server requires)."""
    pki = Pki.make(tmp_path_factory.mktemp("pki"))
    res = boot_scenario(tmp_path, guest, "qcow2", tls=(pki.server, pki.alice))
    assert res.steps == ["root-on-vda", "seed-ok", "write-ok"]
    record_property("vm_seconds", round(res.seconds, 1))
