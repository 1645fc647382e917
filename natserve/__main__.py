"""``python -m natserve``: the same as the ``natserve`` console script."""

from natserve.cli import main

raise SystemExit(main())
