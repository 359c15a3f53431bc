"""Shared fixtures. Tests run on CPU in float32; HF parity tests need the [hf] extra."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest


def pytest_configure(config):
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop each module's compiled programs when it ends: one pytest process runs the whole suite, and
    keeping every executable of every module alive only grows its memory."""
    yield
    import jax

    jax.clear_caches()
