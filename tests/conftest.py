"""Shared fixtures: checkpoints are generated once per test session into a temporary folder, never committed."""

from __future__ import annotations

from pathlib import Path

import pytest

LLAMA_TINY = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> tuple[Path, Path]:
    """(naturelm_dir, llama_dir) of the seeded tiny preset."""
    from export.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0)
