"""``python -m refseg.jobs``: the ``refseg`` command line."""

from __future__ import annotations

import sys

from refseg.jobs.cli import main

if __name__ == "__main__":
    sys.exit(main())
