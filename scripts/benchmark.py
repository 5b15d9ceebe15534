#!/usr/bin/env python
"""Where the time and memory of a request go, section by section (benchmarks/suite.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

from benchmarks.suite import main  # noqa: E402

raise SystemExit(main())
