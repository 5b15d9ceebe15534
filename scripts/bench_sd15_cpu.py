#!/usr/bin/env python
"""Full-size SD 1.5 on a CPU: stock vs handler vs OpenVINO (benchmarks/sd15_cpu.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

from benchmarks.sd15_cpu import main  # noqa: E402

raise SystemExit(main())
