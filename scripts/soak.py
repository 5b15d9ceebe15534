#!/usr/bin/env python
"""Bounded soak of the local server on loopback (benchmarks/soak.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

from benchmarks.soak import main  # noqa: E402

raise SystemExit(main())
