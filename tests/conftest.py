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
