"""Extractive-QA circuits, ATTNATTRIB and steering (jaxinterp.circuits.qa) against direct references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.circuits import qa
from jaxinterp.models.gpt2 import GPT2Config

V, T = 24, 10
L, H = 2, 2


@pytest.fixture(scope="module")
def setup():
    model = ji.init(GPT2Config.tiny(vocab_size=V, d_model=32, n_layers=L, n_heads=H, d_mlp=64, max_seq_len=16), 3)
    rng = np.random.default_rng(0)
    lengths = np.array([10, 8, 9])                          # row 1 and 2 are left padded
    tokens = rng.integers(1, V, size=(3, T)).astype(np.int32)
    mask = np.arange(T)[None, :] >= (T - lengths)[:, None]  # [B, T]
    tokens = np.where(mask, tokens, 0)
    sent = np.full((3, T), -1, np.int32)                    # three sentences of two tokens after a 1-token header
    for b, n in enumerate(lengths):
        start = T - n + 1
        for j in range(3):
            sent[b, start + 2 * j: start + 2 * j + 2] = j
    answer = rng.integers(0, V, size=3).astype(np.int32)
    return model, tokens, mask, sent, answer


def _positions(mask):
    return np.where(mask, np.cumsum(mask, axis=1) - 1, 1)


def _last_logit(model, tokens, mask, answer, ivs=None, positions=None):
    logits = ji.run(model, tokens, interventions=ivs, attention_mask=mask, positions=positions,
                    logits_at=tokens.shape[1] - 1).logits
    return np.asarray(logits)[np.arange(len(answer)), answer]


def test_aggregate_sentences_hand_built_pattern():
    # attention of 2 heads from the answer position to 6 tokens; sentences {1,2}, {3}, {4,5}; token 0 = header
    pattern = np.array([[[0.1, 0.2, 0.3, 0.1, 0.2, 0.1],
                         [0.0, 0.5, 0.0, 0.25, 0.0, 0.25]]], np.float32)  # [B=1, H=2, T]
    sent = np.array([[-1, 0, 0, 1, 2, 2]])
    both = qa.aggregate_sentences(jnp.asarray(pattern.mean(axis=1)), jnp.asarray(sent), 3)
    np.testing.assert_allclose(np.asarray(both), [[(0.5 + 0.5) / 2, (0.1 + 0.25) / 2, (0.3 + 0.25) / 2]], atol=1e-6)
    head1 = qa.aggregate_sentences(jnp.asarray(pattern[:, 1]), jnp.asarray(sent), 3)
    np.testing.assert_allclose(np.asarray(head1), [[0.5, 0.25, 0.25]], atol=1e-6)


def test_head_attention_matches_captured_patterns(setup):
    model, tokens, mask, sent, answer = setup
    weights = np.zeros((L, H), np.float32)
    weights[0, 1] = weights[1, 0] = 1.0
    logits, attn = qa.head_attention(model, tokens, mask, weights)
    out = ji.run(model, tokens, capture="blocks.*.attn.pattern", attention_mask=mask)
    ref = (np.asarray(out.cache["blocks.0.attn.pattern"])[:, 1, -1] + np.asarray(out.cache["blocks.1.attn.pattern"])[:, 0, -1]) / 2
    np.testing.assert_allclose(np.asarray(attn), ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(out.logits)[:, -1], atol=1e-4)
    scores = np.asarray(qa.aggregate_sentences(attn, jnp.asarray(sent), 3))
    for b in range(3):
        for j in range(3):
            np.testing.assert_allclose(scores[b, j], ref[b][sent[b] == j].sum(), atol=1e-5)


def test_leave_one_out_matches_deleting_the_sentence(setup):
    """Reference: a plain loop that deletes the sentence's tokens (the others keep their positions),
    every variant left padded again and run in one batch."""
    model, tokens, mask, sent, answer = setup
    got = np.asarray(qa.leave_one_out(model, tokens, mask, sent, answer, 3))
    pos = _positions(mask)
    rows, masks, positions, answers = [], [], [], []
    for b in range(3):
        for j in (None, 0, 1, 2):  # None: nothing deleted (the base)
            keep = mask[b] & (True if j is None else sent[b] != j)
            pad = T - keep.sum()
            rows.append(np.concatenate([np.zeros(pad, np.int32), tokens[b][keep]]))
            masks.append(np.arange(T) >= pad)
            positions.append(np.concatenate([np.ones(pad, np.int64), pos[b][keep]]))
            answers.append(answer[b])
    ref = _last_logit(model, np.stack(rows), np.stack(masks), np.asarray(answers), positions=np.stack(positions))
    ref = ref.reshape(3, 4)
    np.testing.assert_allclose(got, ref[:, :1] - ref[:, 1:], atol=2e-4)
    assert np.abs(got).max() > 1e-3  # the reference is not trivially zero


@jax.jit
def _patched(model, tokens, mask, z, mlp, z_cell, mlp_cell):
    """Layer 1's attn.z and mlp_out patched where the cells say (one compiled reference)."""
    ivs = {"blocks.1.attn.z": ji.Patch(z, mask=z_cell), "blocks.1.mlp_out": ji.Patch(mlp, mask=mlp_cell)}
    return ji.run(model, tokens, interventions=ivs, attention_mask=mask, logits_at=tokens.shape[1] - 1).logits


def test_mediation_sweep_matches_a_plain_loop(setup):
    model, tokens, mask, sent, answer = setup
    corrupt = np.where(sent == 1, (tokens + 5) % V, tokens).astype(np.int32)
    res = qa.mediation_sweep(model, tokens, corrupt, answer, attention_mask=mask, chunk=3)
    assert res.names == qa.component_names(L, H) and res.effects.shape == (L * H + L, 3)
    bad = ji.run(model, corrupt, capture=["blocks.1.attn.z", "blocks.1.mlp_out"], attention_mask=mask,
                 logits_at=T - 1)
    clean = _last_logit(model, tokens, mask, answer)
    np.testing.assert_allclose(res.total, clean - np.asarray(bad.logits)[np.arange(3), answer], atol=1e-4)
    none = np.zeros((3, T), bool)
    for name in ("L1H0", "L1H1", "L1 MLP"):  # layer 1 only: one compiled reference keeps the test short
        z_cell = np.asarray(ji.heads_mask(T, H, [int(name[-1])], batch=3)) if "MLP" not in name else none[..., None] & False
        z_cell = np.broadcast_to(z_cell, (3, T, H))
        mlp_cell = ~none if "MLP" in name else none
        logits = np.asarray(_patched(model, tokens, mask, bad.cache["blocks.1.attn.z"], bad.cache["blocks.1.mlp_out"],
                                     z_cell, mlp_cell))
        ref = clean - logits[np.arange(3), answer]
        np.testing.assert_allclose(res.effects[res.names.index(name)], ref, atol=1e-4, err_msg=name)
    assert np.abs(res.effects).max() > 1e-3


def test_steering_strength_zero_is_the_unsteered_run(setup):
    model, tokens, mask, sent, answer = setup
    heads = np.zeros((L, H), bool)
    heads[1, 1] = True
    keys = sent == 2
    out = ji.run(model, tokens, capture="blocks.1.attn.pattern", attention_mask=mask, logits_at=T - 1)
    plain = np.asarray(out.logits)  # the unsteered run
    np.testing.assert_allclose(np.asarray(qa.steered_logits(model, tokens, mask, heads, keys, 0.0)), plain, atol=1e-5)
    steered = np.asarray(qa.steered_logits(model, tokens, mask, heads, keys, 3.0))
    assert np.abs(steered - plain).max() > 1e-3
    # reference for a positive strength: the selected head's pattern at the last query, reweighted by e^s on the
    # keys and renormalised, patched in
    p = np.array(out.cache["blocks.1.attn.pattern"])  # [B, H, T, T]
    row = p[:, 1, -1] * np.where(keys, np.exp(3.0), 1.0)
    p[:, 1, -1] = row / row.sum(axis=1, keepdims=True)
    ref = ji.run(model, tokens, interventions={"blocks.1.attn.pattern": ji.Patch(jnp.asarray(p))}, attention_mask=mask,
                 logits_at=T - 1).logits
    np.testing.assert_allclose(steered, np.asarray(ref), atol=1e-4)
