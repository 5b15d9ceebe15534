#!/usr/bin/env python
"""The long hostile-input run against the real handler (benchmarks/fuzz.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

from benchmarks.fuzz import main  # noqa: E402

raise SystemExit(main())
