"""Extractive-QA circuits and ATTNATTRIB (Phukan et al. 2024): context vs parametric memory.

Inputs are left-padded batches: ``tokens [B, T]``, ``mask [B, T]`` (real tokens), the answer is
predicted at the last position ``T - 1``, and ``sentence_ids [B, T]`` says which context sentence
each token belongs to (``-1``: not context: padding, the ``Passage :`` header, the question).

- ``mediation_sweep``: causal mediation per attention head and per MLP. The clean input runs with
  one component's output (``attn.z`` of one head, or ``mlp_out``, at every position) taken from a
  corrupted input (the context corrupted, or the question corrupted); the effect is the drop of the
  answer's logit. All components in one compiled program (``lax.map`` over component masks fed
  through ``ji.ByLayer``).
- ``head_attention`` / ``aggregate_sentences``: ATTNATTRIB. The attention of chosen heads from the
  answer position to every token, summed per context sentence, read in the forward pass that
  produces the answer logits.
- Baselines: ``input_x_gradient`` (per-token ``embed . d logit / d embed``), ``leave_one_out``
  (mask one sentence out of attention, answer-logit drop; one vmapped program over sentences).
- ``steered_logits``: scale the attention of chosen heads toward chosen key positions by adding
  ``strength`` to their attention scores at the answer position (weights x ``e^strength`` before
  renormalisation); strength 0 is the unsteered model.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.families import get_family
from jaxinterp.interventions import Add, ByLayer, Patch
from jaxinterp.model import Model, run

__all__ = ["MediationResult", "component_names", "mediation_sweep", "aggregate_sentences", "head_attention",
           "input_x_gradient", "leave_one_out", "steered_logits", "answer_logits"]


def component_names(n_layers: int, n_heads: int) -> list[str]:
    """``["L0H0", ..., "L{L-1}H{H-1}", "L0 MLP", ..., "L{L-1} MLP"]``: the order of every sweep."""
    return [f"L{l}H{h}" for l in range(n_layers) for h in range(n_heads)] + [f"L{l} MLP" for l in range(n_layers)]


def _dims(model: Model) -> tuple[int, int]:
    return model.config.n_layers, model.config.n_heads


def answer_logits(logits: jax.Array, answer: jax.Array) -> jax.Array:
    """``logits [B, V]``, ``answer [B]`` -> ``[B]``."""
    return jnp.take_along_axis(logits, answer[:, None], axis=1)[:, 0]


# ----------------------------------------------------------------------------- causal mediation


@dataclasses.dataclass(frozen=True)
class MediationResult:
    """``effects [C, B]``: answer-logit drop when component c reads the corrupted input (names in
    ``component_names`` order); ``total [B]``: clean minus fully corrupted answer logit."""

    names: list
    effects: np.ndarray
    total: np.ndarray
    clean: np.ndarray

    def normalized(self) -> np.ndarray:
        """Mean effect over rows divided by the mean total effect: ``[C]``."""
        return self.effects.mean(axis=1) / max(float(self.total.mean()), 1e-9)

    def heads(self, n_layers: int, n_heads: int) -> np.ndarray:
        """Normalised head effects as ``[L, H]``."""
        return self.normalized()[: n_layers * n_heads].reshape(n_layers, n_heads)


def _component_masks(n_layers: int, n_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """``(heads [C, L, H], mlps [C, L])`` one-hot masks, one row per component."""
    c = n_layers * n_heads + n_layers
    eye = np.eye(c, dtype=bool)
    return eye[:, : n_layers * n_heads].reshape(c, n_layers, n_heads), eye[:, n_layers * n_heads:]


@functools.partial(jax.jit, static_argnames=("chunk",))
def _mediation_jit(model, clean, corrupt, mask, answer, head_masks, mlp_masks, *, chunk):
    last = clean.shape[1] - 1
    bad = run(model, corrupt, capture=["blocks.*.attn.z", "blocks.*.mlp_out"], attention_mask=mask, logits_at=last)
    n_layers = head_masks.shape[1]
    z_bad = jnp.stack([bad.cache[f"blocks.{l}.attn.z"] for l in range(n_layers)])     # [L, B, T, H, Dh]
    mlp_bad = jnp.stack([bad.cache[f"blocks.{l}.mlp_out"] for l in range(n_layers)])  # [L, B, T, D]
    b, t = clean.shape

    def one(masks):
        hm, mm = masks  # [L, H], [L]
        ivs = {"blocks.*.attn.z": ByLayer(Patch(z_bad, mask=jnp.broadcast_to(hm[:, None, None, :], z_bad.shape[:4]))),
               "blocks.*.mlp_out": ByLayer(Patch(mlp_bad, mask=jnp.broadcast_to(mm[:, None, None], (n_layers, b, t))))}
        return answer_logits(run(model, clean, interventions=ivs, attention_mask=mask, logits_at=last).logits, answer)

    clean_logit = answer_logits(run(model, clean, attention_mask=mask, logits_at=last).logits, answer)
    patched = jax.lax.map(one, (head_masks, mlp_masks), batch_size=chunk)  # [C, B]
    return clean_logit - patched, clean_logit - answer_logits(bad.logits, answer), clean_logit


def mediation_sweep(model: Model, clean, corrupt, answer, *, attention_mask=None, chunk: int = 8) -> MediationResult:
    """Per-head and per-MLP indirect effects of a corruption on the answer logit (one program).

    Args:
      clean, corrupt: ``[B, T]`` token ids of the same shape (left padded alike); ``corrupt`` differs
        where the context (or the question) is corrupted.
      answer: ``[B]`` the answer token whose logit at the last position is measured.
    """
    clean, corrupt = jnp.asarray(clean, jnp.int32), jnp.asarray(corrupt, jnp.int32)
    if clean.shape != corrupt.shape or clean.ndim != 2:
        raise ValueError(f"clean and corrupt must be [B, T] of one shape, got {clean.shape} and {corrupt.shape}")
    n_layers, n_heads = _dims(model)
    mask = jnp.ones(clean.shape, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    heads, mlps = _component_masks(n_layers, n_heads)
    effects, total, clean_logit = _mediation_jit(model, clean, corrupt, mask, jnp.asarray(answer, jnp.int32),
                                                 jnp.asarray(heads), jnp.asarray(mlps), chunk=chunk)
    return MediationResult(component_names(n_layers, n_heads), np.asarray(effects), np.asarray(total),
                           np.asarray(clean_logit))


# ----------------------------------------------------------------------------- ATTNATTRIB


def aggregate_sentences(weights: jax.Array, sentence_ids: jax.Array, n_sentences: int) -> jax.Array:
    """Per-sentence sums ``[B, N]`` of per-token ``weights [B, T]`` (``sentence_ids`` -1: ignored)."""
    one_hot = jax.nn.one_hot(sentence_ids, n_sentences, dtype=weights.dtype)  # [B, T, N]; -1 -> all zeros
    return jnp.einsum("bt,btn->bn", weights, one_hot)


@jax.jit
def _head_attention_jit(model, tokens, mask, head_weights):
    n_layers = head_weights.shape[0]
    last = tokens.shape[1] - 1
    out = run(model, tokens, capture=["blocks.*.attn.pattern"], attention_mask=mask, logits_at=last)
    pattern = jnp.stack([out.cache[f"blocks.{l}.attn.pattern"][:, :, last, :] for l in range(n_layers)])  # [L,B,H,S]
    attn = jnp.einsum("lbhs,lh->bs", pattern, head_weights) / jnp.maximum(head_weights.sum(), 1e-9)
    return out.logits, attn


def head_attention(model: Model, tokens, attention_mask, head_weights) -> tuple[jax.Array, jax.Array]:
    """``(logits [B, V] at the last position, attention [B, T])``: the attention from the last
    position to every token averaged over heads with ``head_weights [L, H]`` (one forward pass)."""
    return _head_attention_jit(model, jnp.asarray(tokens, jnp.int32), jnp.asarray(attention_mask, bool),
                               jnp.asarray(head_weights, jnp.float32))


def _d_model(model: Model) -> int:
    return get_family(model.family).embedding(model.params).shape[1]


@jax.jit
def _ixg_jit(model, tokens, mask, answer):
    last = tokens.shape[1] - 1
    b, t = tokens.shape

    def f(delta):  # delta = 0 is added at embed, so d f / d delta = d answer_logit / d embed
        out = run(model, tokens, capture=["embed"], interventions={"embed": Add(delta)}, attention_mask=mask,
                  logits_at=last)
        return answer_logits(out.logits, answer).sum(), out.cache["embed"]

    grad, emb = jax.grad(f, has_aux=True)(jnp.zeros((b, t, _d_model(model)), jnp.float32))  # [B, T, D]
    return jnp.abs(jnp.sum(emb * grad, axis=-1))  # [B, T]


def input_x_gradient(model: Model, tokens, attention_mask, answer) -> jax.Array:
    """``|sum_d embed * d answer_logit / d embed|`` per token ``[B, T]``."""
    return _ixg_jit(model, jnp.asarray(tokens, jnp.int32), jnp.asarray(attention_mask, bool),
                    jnp.asarray(answer, jnp.int32))


@functools.partial(jax.jit, static_argnames=("n_sentences",))
def _loo_jit(model, tokens, mask, sentence_ids, answer, *, n_sentences):
    last = tokens.shape[1] - 1
    positions = jnp.where(mask, jnp.cumsum(mask, axis=1) - 1, 1)  # the mask's positions, kept when holes are cut
    base = answer_logits(run(model, tokens, attention_mask=mask, positions=positions, logits_at=last).logits, answer)

    def drop(j):
        held = mask & (sentence_ids != j)
        logits = run(model, tokens, attention_mask=held, positions=positions, logits_at=last).logits
        return base - answer_logits(logits, answer)

    return jax.lax.map(drop, jnp.arange(n_sentences)).T  # [B, N]


def leave_one_out(model: Model, tokens, attention_mask, sentence_ids, answer, n_sentences: int) -> jax.Array:
    """``[B, N]``: the answer-logit drop when sentence j is masked out of attention (positions kept).

    A row with fewer than N sentences gets 0 for the missing ones (nothing is masked)."""
    return _loo_jit(model, jnp.asarray(tokens, jnp.int32), jnp.asarray(attention_mask, bool),
                    jnp.asarray(sentence_ids, jnp.int32), jnp.asarray(answer, jnp.int32), n_sentences=n_sentences)


# ----------------------------------------------------------------------------- steering


@jax.jit
def _steer_jit(model, tokens, mask, head_mask, key_mask, strength):
    n_layers, n_heads = head_mask.shape
    b, t = tokens.shape
    query = jnp.arange(t) == t - 1                                                        # [Tq]
    bias = (head_mask[:, None, :, None, None] & query[None, None, None, :, None]
            & key_mask[None, :, None, None, :])                                            # [L, B, H, Tq, S]
    iv = {"blocks.*.attn.scores": ByLayer(Add(strength * bias.astype(jnp.float32)))}
    return run(model, tokens, interventions=iv, attention_mask=mask, logits_at=t - 1).logits


def steered_logits(model: Model, tokens, attention_mask, head_mask, key_mask, strength: float) -> jax.Array:
    """Logits ``[B, V]`` at the last position with ``strength`` added to the attention scores of the
    heads in ``head_mask [L, H]`` from the last position to the keys in ``key_mask [B, T]``."""
    return _steer_jit(model, jnp.asarray(tokens, jnp.int32), jnp.asarray(attention_mask, bool),
                      jnp.asarray(head_mask, bool), jnp.asarray(key_mask, bool), jnp.float32(strength))
