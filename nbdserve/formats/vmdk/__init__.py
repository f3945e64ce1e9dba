"""VMDK (VMware virtual disks): descriptor, hosted sparse, seSparse and flat extents, the driver."""

from .driver import VmdkDriver

__all__ = ["VmdkDriver"]
