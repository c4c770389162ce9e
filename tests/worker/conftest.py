from __future__ import annotations

from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

from worker.testing.tiny import ARCHITECTURES, write_tiny_checkpoint

TINY_LAYERS = 6
TINY_HIDDEN = 128


@pytest.fixture(scope="session", autouse=True)
def quiet_transformers() -> None:
    hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small checkpoint per supported family, written once per test session."""
    root = tmp_path_factory.mktemp("models")
    return {
        arch: write_tiny_checkpoint(root / arch, arch=arch, layers=TINY_LAYERS, hidden=TINY_HIDDEN)
        for arch in ARCHITECTURES
    }
