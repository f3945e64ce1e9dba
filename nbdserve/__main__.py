"""``python -m nbdserve``: the same as the ``nbdserve`` command."""

from .cli import main

raise SystemExit(main())
