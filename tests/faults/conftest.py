"""Fault-injection suite: shared set-up.

The e2e helpers (tests/e2e) and the chat/serve fixtures (tests/unit/serve/conftest.py) are
reused, not copied: the first by path, the second by loading that conftest under another name.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "e2e"))
sys.path.insert(0, str(HERE))

_spec = importlib.util.spec_from_file_location("serve_fixtures", HERE.parent / "unit" / "serve" / "conftest.py")
_serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_serve)
lively_model_path = _serve.lively_model_path
chat_model = _serve.chat_model
live_server = _serve.live_server

from fault_helpers import References  # noqa: E402


@pytest.fixture(scope="session")
def refs(tmp_path_factory) -> References:
    """Uninterrupted reference runs of each step (built on first use, once per session)."""
    return References(tmp_path_factory.mktemp("fault-refs"))
