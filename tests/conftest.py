"""Shared test set-up: offline hubs, a private cache, tiny random models."""

import os
import sys
from pathlib import Path

# Before anything imports transformers/datasets: never reach for a hub in tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("CHATRL_CACHE", str(Path(__file__).resolve().parent.parent / ".cache-test"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """A 2-layer, hidden-64 Llama (GQA) with a byte-level BPE tokenizer and a chat template."""
    from chatrl.models import resolve_model_path

    return resolve_model_path("tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from chatrl.models import load_tokenizer

    return load_tokenizer(tiny_model_path)
