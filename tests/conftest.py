from __future__ import annotations

from pathlib import Path

import pytest
from lmutil import STORIES, TINY_CONFIGS, save_tiny_model


def pytest_configure(config):
    if not STORIES.is_dir():
        raise pytest.UsageError(f"tests need the shared models and data at {STORIES.parent.parent}")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: save_tiny_model(make(), root / name) for name, make in TINY_CONFIGS.items()}
