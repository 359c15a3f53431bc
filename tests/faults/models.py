"""Tiny models shared by the fault cases (built once per process; use ``warm`` as a case's ``setup``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxinterp as ji
from jaxinterp.models.gpt2 import GPT2Config

D_MODEL = 16
CONFIG = GPT2Config.tiny(vocab_size=32, d_model=D_MODEL, n_layers=2, n_heads=2, d_mlp=32, max_seq_len=8)


@functools.lru_cache(maxsize=None)
def tiny(seed: int) -> ji.Model:
    """A 2-layer GPT-2 (d_model 16, vocab 32, context 8) with seed-dependent random weights.

    Shapes come from tracing ``ji.init`` (``eval_shape``, no compile); values from numpy, which is
    ~20x faster than running the initialisers on a loaded 2-core machine.
    """
    shapes = jax.eval_shape(lambda: ji.init(CONFIG, 0)).params
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.2, s.dtype), shapes)
    return ji.Model(params, CONFIG, "gpt2")


def warm() -> None:
    tiny(1)
    tiny(2)
