"""``python -m decodekit``: see :mod:`decodekit.cli`."""

from .cli import main

raise SystemExit(main())
