"""Shared checks of the model-zoo parity tests: a loaded port vs the transformers model it came from."""

from __future__ import annotations

import numpy as np

from tests.hf_utils import hooked_forward, max_err, torch

TOL = 1e-4


def assert_matches_hf(model, hf, tokens, outputs=None, inputs=None, *, tol: float = TOL,
                      attentions: bool = True) -> dict:
    """Logits, every hidden state and (``attentions``) every attention pattern transformers returns,
    plus the module outputs / inputs recorded by ``outputs`` / ``inputs`` ({site: torch module},
    site = a full site name), all within ``tol`` in float32. Returns our cache."""
    ref, rec = hooked_forward(hf, tokens, outputs, inputs)
    out = model.run(tokens, capture="all")
    c = out.cache
    n = model.config.n_layers
    assert max_err(out.logits, ref.logits) < tol, max_err(out.logits, ref.logits)
    assert len(ref.hidden_states) == n + 1
    assert max_err(c["embed"], ref.hidden_states[0]) < tol
    for i in range(n - 1):
        assert max_err(c[f"blocks.{i}.resid_post"], ref.hidden_states[i + 1]) < tol, i
    assert max_err(c["final_norm"], ref.hidden_states[n]) < tol
    if attentions:
        assert ref.attentions is not None and len(ref.attentions) == n
        for i in range(n):
            assert max_err(c[f"blocks.{i}.attn.pattern"], ref.attentions[i]) < tol, i
    for site, value in rec.items():
        if value.shape != c[site].shape and value.size == c[site].size:  # HF flattens [B * T, ...] (MoE routers)
            value = value.reshape(c[site].shape)
        assert max_err(c[site], value) < tol, site
    return c


def padded_batch(vocab: int, lengths=(5, 9, 12), side: str = "left", seed: int = 7):
    """``(tokens [B, T], mask [B, T], rows)``: prompts of ``lengths`` padded to the longest."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    tokens = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    rows = []
    for i, n in enumerate(lengths):
        row = rng.integers(1, vocab, n)
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        tokens[i, sl], mask[i, sl] = row, 1
        rows.append(row)
    return tokens, mask, rows


def assert_padded_matches_hf(model, hf, vocab: int, side: str = "left", tol: float = TOL) -> None:
    """A padded batch with HF's position ids: logits and hidden states at real tokens, and the most
    padded row equal to its prompt run alone."""
    tokens, mask, rows = padded_batch(vocab, side=side)
    positions = np.where(mask == 1, np.cumsum(mask, 1) - 1, 1)
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask), output_hidden_states=True,
                 position_ids=torch.as_tensor(positions))
    out = model.run(tokens, attention_mask=mask, capture="blocks.*.resid_post")
    real = mask.astype(bool)
    assert max_err(np.asarray(out.logits)[real], ref.logits.numpy()[real]) < tol
    for i in range(model.config.n_layers - 1):
        assert max_err(np.asarray(out.cache[f"blocks.{i}.resid_post"])[real], ref.hidden_states[i + 1].numpy()[real]) < tol
    if model.config.arch.rope is not None and model.config.arch.rope.length_dependent:
        return  # dynamic NTK / LongRoPE scale for the batch's length, so a row alone legitimately differs
    alone = np.asarray(model.run(rows[0][None]).logits[0])  # the most padded row, run without padding
    assert max_err(np.asarray(out.logits[0])[real[0]], alone) < tol


def assert_bf16_runs(path, vocab: int) -> None:
    """A bfloat16 load runs and stays close to the float32 model."""
    import jaxinterp as ji

    f32 = ji.load(path)
    bf16 = ji.load(path, dtype="bfloat16")
    tokens = np.random.default_rng(1).integers(0, vocab, size=(2, 9))
    ref = np.asarray(f32.run(tokens).logits)
    out = bf16.run(tokens, capture=["blocks.0.resid_post"])
    assert out.logits.dtype == np.dtype("bfloat16")
    assert out.cache["blocks.0.resid_post"].dtype == np.dtype("bfloat16")
    assert np.isfinite(np.asarray(out.logits, np.float32)).all()
    assert max_err(out.logits, ref) < 0.05 * np.abs(ref).max() + 1e-3
