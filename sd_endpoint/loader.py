"""Build a repository's ``EndpointHandler`` the way the Inference Endpoints runtime does.

The runtime puts the model folder first on ``sys.path``, executes its ``handler.py`` by file
path and calls ``EndpointHandler(model_dir)`` with the folder as one positional ``str``.
Doing exactly that locally means what works here works there.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_handler(model_dir: str | Path = REPO_ROOT) -> Any:
    model_dir = Path(model_dir).resolve()
    handler_file = model_dir / "handler.py"
    if not handler_file.is_file():
        raise FileNotFoundError(f"{model_dir} has no handler.py")
    if str(model_dir) not in sys.path:
        sys.path.insert(0, str(model_dir))
    spec = importlib.util.spec_from_file_location("handler", handler_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EndpointHandler(str(model_dir))
