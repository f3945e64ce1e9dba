"""VHDX (Hyper-V virtual hard disk v2): header section, metadata, BAT, log, and the driver."""

from .driver import VhdxDriver

__all__ = ["VhdxDriver"]
