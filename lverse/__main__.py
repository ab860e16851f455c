"""``python -m lverse ...`` is the ``lverse`` command."""
from lverse.cli import main

raise SystemExit(main())
