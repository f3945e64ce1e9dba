"""Negative control: the boot scenario must fail, for the right reason, when writes get corrupted.

The VM reaches the server through ``wproxy.CorruptingProxy``, which flips one byte of every write
payload while the server still acknowledges it.  The failure must come from the guest's own
read-back check (or the host's check of the image): the VM booted, its root was the NBD disk and
the seeded files read correctly through the same proxy, so the checks downstream of that are
what catches bad data.
"""

from __future__ import annotations

import contextlib

import pytest
from vmkit import ScenarioFailed, VmResult
from vmscenarios import boot_scenario
from wproxy import CorruptingProxy

pytestmark = pytest.mark.vm


def test_corrupted_writes_are_detected(tmp_path, guest):
    proxies: list[CorruptingProxy] = []

    @contextlib.contextmanager
    def corrupting(port: int):
        with CorruptingProxy(port) as proxy:
            proxies.append(proxy)
            yield proxy.port

    with pytest.raises(ScenarioFailed) as failed:
        boot_scenario(tmp_path, guest, "raw", via=corrupting)
    err = failed.value
    seen = VmResult.parse(err.serial, 0)
    assert seen.booted and seen.steps[:2] == ["root-on-vda", "seed-ok"], str(err)
    assert proxies[0].corrupted_writes > 0
    if err.where == "guest":
        assert err.reason.startswith(("write-verify", "read back")), str(err)
    else:
        assert err.where == "host", str(err)
