"""pytest configuration: the ``--no-vm`` and ``--no-ceph`` flags (skip the tests that boot a VM /
start a Ceph cluster) and the slow-mode switch."""

from __future__ import annotations

import os

import pytest


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
