"""Tiny models shared by the fault cases (built once per process; use them in a case's ``setup``)."""

from __future__ import annotations

import functools

import jaxinterp as ji
from jaxinterp.models.gpt2 import GPT2Config

D_MODEL = 16


@functools.lru_cache(maxsize=None)
def tiny(seed: int) -> ji.Model:
    """A 2-layer GPT-2 (d_model 16, vocab 32, context 8) with seed-dependent weights."""
    config = GPT2Config.tiny(vocab_size=32, d_model=D_MODEL, n_layers=2, n_heads=2, d_mlp=32, max_seq_len=8)
    return ji.init(config, seed)


def warm() -> None:
    tiny(1)
    tiny(2)
