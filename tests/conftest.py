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


# The longest test files (wall seconds in a `--durations` run on 2 cores, 2026-11-30), started
# first: with `-n 2 --dist loadfile` each file runs whole on one worker, and a long file started
# last would keep one worker busy while the other sits idle.
LONGEST_FIRST = ("e2e/test_dschat_scripts.py", "faults/test_steps.py", "e2e/test_grpo.py",
                 "faults/test_outputs.py", "e2e/test_ppo_correctness.py", "e2e/test_distributed.py",
                 "e2e/test_pipeline.py", "e2e/test_rl_ranks.py", "e2e/test_dschat_compat.py",
                 "e2e/test_sft_rm.py", "faults/test_inputs.py", "e2e/test_dschat_tools.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (rank(item), order[id(item)]))


def pytest_sessionstart(session):
    """Build the tiny random models once, before pytest-xdist's workers start (`-n 2`): a worker
    and another worker's child process must never race to write the same cache folder. Each
    worker (which has `workerinput`) and a plain run find them built."""
    if hasattr(session.config, "workerinput"):
        return
    from chatrl.models import resolve_model_path
    from chatrl.models.tiny import TINY_ARCHS

    for arch in TINY_ARCHS:
        resolve_model_path(f"tiny-{arch}")


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """A 2-layer, hidden-64 Llama (GQA) with a byte-level BPE tokenizer and a chat template."""
    from chatrl.models import resolve_model_path

    return resolve_model_path("tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from chatrl.models import load_tokenizer

    return load_tokenizer(tiny_model_path)


# ---------------------------------------------------------------------------------------------
# A real headless browser for the web page tests: Debian's chromium + chromedriver, driven by
# Selenium (.ci/run installs both). Offline: no browser download, no background networking.

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def _first(paths):
    return next((p for p in paths if os.path.exists(p)), None)


@pytest.fixture()
def browser(tmp_path):
    """A headless Chromium (Selenium WebDriver), closed after the test; skipped, saying what
    is missing, where no browser can be installed."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("browser tests need the selenium package: pip install -e '.[test]'")
    binary, driver_path = _first(CHROMIUM), _first(CHROMEDRIVER)
    if binary is None or driver_path is None:
        pytest.skip("browser tests need Chromium and its driver: apt-get install -y chromium "
                    "chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,900", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
