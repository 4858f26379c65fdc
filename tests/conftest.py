from __future__ import annotations

import os

# Two xdist workers share the machine's cores (pyproject's addopts: `-n auto`), so each
# runs torch, and every lm_eval subprocess it starts, on one thread instead of competing
# for all of them. Set before torch is imported here or in any subprocess.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest
import torch
from lmutil import SHARED, STORIES, TINY_CONFIGS, save_tiny_model

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_configure(config):
    """In CI (`CI` set) a missing `../shared` is an error: CI must run every test."""
    if os.environ.get("CI") and not STORIES.is_dir():
        raise pytest.UsageError(f"CI runs every test, and they need ../shared at {SHARED}")


def pytest_collection_modifyitems(config, items):
    """Tests marked `shared` read `../shared` (real models, release data). Without it they
    are skipped with the reason, so the unit tests still run from a clone alone."""
    if STORIES.is_dir():
        return
    skip = pytest.mark.skip(reason=f"needs the shared models and data at {SHARED}")
    for item in items:
        if item.get_closest_marker("shared"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: save_tiny_model(make(), root / name) for name, make in TINY_CONFIGS.items()}
