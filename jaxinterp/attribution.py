"""Direct logit attribution (DLA): how much each component writes the target's logit directly.

The final residual is a sum of what the components wrote: ``x = embed + sum_l (attn_out_l +
mlp_out_l)`` (parallel blocks add both to the same stream; sandwich norms sit inside the sums).
The logit of a token is ``w_t . norm(x) + c_t``. The final norm is not linear, so, as
TransformerLens does, its scale is **frozen at the final residual's value**: with
``s = sqrt(var(x) + eps)`` (LayerNorm, which also centres) or ``sqrt(mean(x^2) + eps)`` (RMSNorm),
component ``c`` is credited ``w_t . (centre(c) / s * g)``, where ``g`` is the norm's gain. The
credits then sum exactly to the logit minus ``bias`` (the norm's bias and the unembedding's bias,
which no component writes). Heads split ``attn_out`` further through ``jaxinterp.heads``:
``attn = heads.sum(-1) + attn_bias``; this needs the attention output projection to write the
residual directly (pre-norm blocks; sandwich blocks normalise ``attn_out`` first, so their heads are
not additive and ``heads`` is None).

DLA reads only the direct path: a head that changes what later layers compute gets no credit for
that here (use patching for total effects).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinterp.families import get_family
from jaxinterp.heads import head_contributions
from jaxinterp.lens.logit import gather, jit_when_arrays
from jaxinterp.model import Model, prepare_inputs, run

__all__ = ["DLA", "direct_logit_attribution", "final_norm_spec", "unembed_direction"]


@struct.dataclass
class DLA:
    """Direct logit attribution at one position per row (arrays over the batch ``B``).

    ``embed [B]`` token (+ position) embeddings; ``attn [B, L]`` each layer's ``attn_out``;
    ``heads [B, L, H]`` and ``attn_bias [B, L]`` (None where heads do not add up to ``attn_out``);
    ``mlp [B, L]``; ``logit [B]`` the model's logit (or logit difference) for the target; ``bias [B]``
    the part of it no component writes; ``scale [B]`` the frozen final-norm scale.
    ``total() == logit - bias``.
    """

    embed: jax.Array
    attn: jax.Array
    heads: Optional[jax.Array]
    attn_bias: Optional[jax.Array]
    mlp: jax.Array
    logit: jax.Array
    bias: jax.Array
    scale: jax.Array

    def total(self) -> jax.Array:
        """Sum of every component's credit ``[B]`` (equals ``logit - bias``)."""
        return self.embed + self.attn.sum(-1) + self.mlp.sum(-1)

    def components(self) -> dict[str, jax.Array]:
        """``{name: [B]}``: ``embed``, ``L{i}.attn`` (or ``L{i}.H{h}`` + ``L{i}.attn_bias``), ``L{i}.mlp``."""
        out = {"embed": self.embed}
        for i in range(self.attn.shape[-1]):
            if self.heads is None:
                out[f"L{i}.attn"] = self.attn[:, i]
            else:
                out.update({f"L{i}.H{h}": self.heads[:, i, h] for h in range(self.heads.shape[-1])})
                out[f"L{i}.attn_bias"] = self.attn_bias[:, i]
            out[f"L{i}.mlp"] = self.mlp[:, i]
        return out


def _arch(model: Model, what: str):
    fam = get_family(model.family)
    try:
        arch = model.config.arch if fam.attention else None
    except AttributeError:
        arch = None
    if arch is None:
        raise ValueError(f"{what} needs a transformer on the shared block (attention heads, MLPs, a final norm); "
                         f"model family {model.family!r} is not one")
    return arch


def final_norm_spec(model: Model, what: str = "this") -> tuple[bool, float, jax.Array, Optional[jax.Array]]:
    """``(centres, eps, gain [D], bias [D] or None)`` of the final norm (gain includes Gemma's ``1 +``)."""
    arch = _arch(model, what)
    p = model.params["final_norm"]
    gain = p["scale"].astype(jnp.float32) + arch.norm_offset
    bias = p["bias"].astype(jnp.float32) if arch.norm == "layernorm" and arch.norm_bias else None
    return arch.norm == "layernorm", float(arch.norm_eps), gain, bias


def unembed_direction(model: Model, target, minus=None) -> tuple[jax.Array, jax.Array]:
    """``(w [B, D], c [B])``: logit = ``w . final_norm(x) + c`` for token ids ``target [B]`` (minus ``minus``)."""
    arch = _arch(model, "the unembedding")
    if arch.tie_embeddings:
        w_u = model.params["embed"].T  # [D, V]
    else:
        w_u = model.params["lm_head"]["kernel"]
    b_u = model.params["lm_head"]["bias"] if arch.lm_head_bias else jnp.zeros((w_u.shape[1],), w_u.dtype)
    w, c = w_u.T[target], b_u[target]  # [B, D], [B]
    if minus is not None:
        w, c = w - w_u.T[minus], c - b_u[minus]
    return w.astype(jnp.float32), c.astype(jnp.float32)


def _token_ids(model: Model, x, b: int, what: str):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if x.ndim == 0:
        x = jnp.full((b,), x)
    if x.shape != (b,) or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{what} must be a token id or an int array [B] = [{b}], got shape {tuple(x.shape)}")
    if not isinstance(x, jax.core.Tracer):
        v = model.config.vocab_size
        if np.any((np.asarray(x) < 0) | (np.asarray(x) >= v)):
            raise ValueError(f"{what} token ids must lie in [0, {v})")
    return jnp.asarray(x, jnp.int32)


def direct_logit_attribution(model: Model, tokens, target, *, minus=None, position=-1, attention_mask=None,
                             positions=None, interventions=None) -> DLA:
    """Per-layer, per-head and per-MLP direct contributions to the logit of ``target`` at ``position``.

    Args:
      model: a transformer ``Model`` without final-logit soft-capping (tanh is not linear).
      tokens: token ids ``[B, T]`` or text (as ``ji.run``).
      target: token id (every row) or ids ``[B]`` whose logit is attributed.
      minus: optional token id(s): attribute the logit difference ``target - minus`` instead.
      position: an int (every row; default ``-1``, each row's last token) or ``[B]``.
      attention_mask, positions, interventions: as ``ji.run``.
    """
    arch = _arch(model, "direct_logit_attribution")
    if arch.final_softcap is not None:
        raise ValueError(f"direct_logit_attribution: logits are soft-capped (tanh, cap {arch.final_softcap}), so no "
                         f"component's share of a logit is defined")
    tokens, mask, positions, at = prepare_inputs(model, tokens, attention_mask, positions, position)
    if at.ndim != 1:
        raise ValueError("position must be an int or an int array [B] (one position per row)")
    b = tokens.shape[0]
    target = _token_ids(model, target, b, "target")
    minus = None if minus is None else _token_ids(model, minus, b, "minus")
    dla, residual_error = _dla_program(model, tokens, mask, positions, at, target, minus, interventions=interventions)
    _check_residual_sum(residual_error)
    return dla


def _dla(model: Model, tokens, mask, positions, at, target, minus, *, interventions) -> tuple[DLA, jax.Array]:
    n = model.config.n_layers
    heads_add_up = get_family(model.family).projections(model.config)["attn.o"].out_site == "attn_out"
    last = f"blocks.{n - 1}.resid_post"
    capture = ["embed", "blocks.*.attn_out", "blocks.*.mlp_out", last] + (["blocks.*.attn.z"] if heads_add_up else [])
    out = run(model, tokens, capture=capture, interventions=interventions, attention_mask=mask, positions=positions,
              logits_at=at)
    c = {k: gather(v, at).astype(jnp.float32) for k, v in out.cache.items()}  # [B, ...]
    centres, eps, gain, norm_bias = final_norm_spec(model)
    w, lm_bias = unembed_direction(model, target, minus)  # [B, D], [B]
    x = c[last]  # [B, D]
    if centres:
        scale = jnp.sqrt(jnp.var(x, -1) + eps)  # [B]
    else:
        scale = jnp.sqrt(jnp.mean(jnp.square(x), -1) + eps)
    wg = w * gain / scale[:, None]  # [B, D]: the frozen linear read-out

    def credit(v):  # v [B, ..., D] -> [B, ...]
        v = v - v.mean(-1, keepdims=True) if centres else v
        return jnp.einsum("b...d,bd->b...", v, wg)

    attn = jnp.stack([credit(c[f"blocks.{i}.attn_out"]) for i in range(n)], -1)  # [B, L]
    mlp = jnp.stack([credit(c[f"blocks.{i}.mlp_out"]) for i in range(n)], -1)
    heads = attn_bias = None
    if heads_add_up:
        heads = jnp.stack([credit(head_contributions(model, c[f"blocks.{i}.attn.z"][:, None], i)[:, 0])
                           for i in range(n)], 1)  # [B, L, H]
        attn_bias = attn - heads.sum(-1)  # the output projection's bias (zero without one)
    bias = lm_bias + (jnp.einsum("d,bd->b", norm_bias, w) if norm_bias is not None else 0.0)
    logits = out.logits.astype(jnp.float32)
    logit = jnp.take_along_axis(logits, target[:, None], 1)[:, 0]
    if minus is not None:
        logit = logit - jnp.take_along_axis(logits, minus[:, None], 1)[:, 0]
    total = c["embed"] + sum(c[f"blocks.{i}.attn_out"] + c[f"blocks.{i}.mlp_out"] for i in range(n))
    residual_error = jnp.max(jnp.abs(total - x)) / (1.0 + jnp.max(jnp.abs(x)))
    return DLA(embed=credit(c["embed"]), attn=attn, heads=heads, attn_bias=attn_bias, mlp=mlp, logit=logit,
               bias=bias, scale=scale), residual_error


_dla_program = jit_when_arrays(_dla)


def _check_residual_sum(residual_error) -> None:
    """Refuse a block whose residual is not embed + attn_out + mlp_out (DLA would be silently wrong)."""
    if isinstance(residual_error, jax.core.Tracer):
        return
    if float(residual_error) > 1e-3:
        raise ValueError(f"direct_logit_attribution: the final residual is not the sum of embed, attn_out and mlp_out "
                         f"(relative error {float(residual_error):.3g}); this block is not additive, so DLA is undefined")
