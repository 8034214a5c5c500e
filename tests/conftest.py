"""Shared fixtures. Tests never reach the Hugging Face hub; offline assets come from the fcmoe cache."""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from fcmoe.models.build import BuiltModel  # noqa: E402
from tests.helpers import tiny_model


@pytest.fixture
def tiny() -> BuiltModel:
    return tiny_model()


@pytest.fixture(autouse=True)
def _deterministic() -> Iterator[None]:
    """Seed torch; undo a CLI call's --threads choice, which is the process's (fcmoe.cli sets it per command)."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
