"""nbdserve: a Network Block Device server for disk images (raw, qcow2, QED, VHD, VHDX)."""

__version__ = "0.1.0"
