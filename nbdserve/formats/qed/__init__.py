"""QED (QEMU Enhanced Disk): header, tables, consistency check and the driver."""

from .driver import QedDriver

__all__ = ["QedDriver"]
