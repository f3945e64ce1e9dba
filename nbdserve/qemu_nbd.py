"""``python -m nbdserve.qemu_nbd``: nbdserve with qemu-nbd's defaults (see ``nbdserve.cli``), the
same as the ``nbdserve-qemu-nbd`` command or a link to ``nbdserve`` named ``qemu-nbd``."""

from .cli import qemu_nbd_main

if __name__ == "__main__":
    raise SystemExit(qemu_nbd_main())
