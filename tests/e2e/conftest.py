"""Fixtures of the e2e VM tests: the guest kernel and initramfs, built once per session."""

from __future__ import annotations

import pytest
import vmkit
from vmscenarios import Guest


@pytest.fixture(scope="session")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    vmkit.require_tools()
    k = vmkit.kernel()
    return Guest(k, vmkit.build_initramfs(tmp_path_factory.mktemp("initramfs"), k))


@pytest.fixture(params=vmkit.FORMATS)
def fmt(request: pytest.FixtureRequest) -> str:
    """Every image format; one whose driver is not registered yet is skipped."""
    if not vmkit.format_available(request.param):
        pytest.skip(f"no {request.param} driver in nbdserve.formats.BY_NAME yet")
    return request.param
