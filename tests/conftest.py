"""pytest configuration: the ``--no-vm`` flag (skip VM-level e2e tests) and slow-mode switch."""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--no-vm", action="store_true", help="skip the end-to-end tests that boot a VM")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--no-vm"):
        skip = pytest.mark.skip(reason="--no-vm given")
        for item in items:
            if "vm" in item.keywords:
                item.add_marker(skip)


SLOW = os.environ.get("NBDSERVE_SLOW") == "1"
