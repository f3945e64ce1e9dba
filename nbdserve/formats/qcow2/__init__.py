"""The qcow2 format (versions 2 and 3): see ``driver.Qcow2Driver`` and the sibling modules."""

from .driver import Qcow2Driver

__all__ = ["Qcow2Driver"]
