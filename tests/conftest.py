"""pytest configuration: the ``--no-vm`` and ``--no-ceph`` flags (skip the tests that boot a VM /
start a Ceph cluster), the slow-mode switch, and the session's one Ceph cluster (``ceph``; tests
marked ``ceph`` use it, in tests/ceph/ and tests/e2e/ alike).

The cluster starts on first use, so a run that selects no Ceph test starts nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.cephcluster import ENV, CephCluster, running_cluster

CEPH_TOOLS = ("ceph-mon", "ceph-osd", "radosgw", "ceph", "rbd", "radosgw-admin", "monmaptool", "ceph-authtool")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--no-vm", action="store_true", help="skip the end-to-end tests that boot a VM")
    parser.addoption("--no-ceph", action="store_true", help="skip the tests that start a Ceph cluster")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for flag, marker in (("--no-vm", "vm"), ("--no-ceph", "ceph")):
        if config.getoption(flag):
            skip = pytest.mark.skip(reason=f"{flag} given")
            for item in items:
                if marker in item.keywords:
                    item.add_marker(skip)


SLOW = os.environ.get("NBDSERVE_SLOW") == "1"


@pytest.fixture(scope="session")
def ceph(tmp_path_factory) -> Iterator[CephCluster]:
    """A single-node cluster (mon, OSD, radosgw on 127.0.0.1) for the whole session."""
    missing = [exe for exe in CEPH_TOOLS if shutil.which(exe, path=ENV["PATH"]) is None]
    if missing:
        pytest.fail(f"the Ceph tests need {', '.join(missing)} (tests/run.sh installs them); or pass --no-ceph")
    with running_cluster(tmp_path_factory.mktemp("ceph")) as cluster:
        yield cluster
