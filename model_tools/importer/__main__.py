"""``python -m model_tools.importer``: see cli.py."""

import sys

from model_tools.importer.cli import main

if __name__ == "__main__":
    sys.exit(main())
