"""``python -m model_tools.single_file``: see cli.py."""

from model_tools.single_file.cli import main

if __name__ == "__main__":
    main()
