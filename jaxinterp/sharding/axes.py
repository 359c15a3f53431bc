"""Logical axis names for every parameter and every activation site.

One vocabulary for parameters, activations and sharding rules (see ``jaxinterp.sites``):

    batch, seq, embed, heads, kv_heads, head_dim, mlp, vocab, layers, latents,
    d_inner, ssm_state, conv

``None`` marks an axis that is never sharded (positions table, LoRA rank, a conv's
singleton channel axis, ...).

Parameter axes are derived from the parameter's path (``"h_3/attn/c_attn/kernel"``)
with one regex table per family, kept here in one place so the ports stay free of
sharding concerns. A parameter that matches no row, or whose rank differs from the
row's, raises naming the parameter and the family's table: a silently replicated
parameter is a memory bug on a large model.

Activation axes are derived from the site name (the suffix after ``blocks.{i}.``).
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import jax

__all__ = [
    "AXES",
    "PARAM_AXES",
    "SITE_AXES",
    "LOGITS_AXES",
    "TOKENS_AXES",
    "param_axes",
    "site_axes",
    "path_str",
]

AXES = ("batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers", "latents",
        "d_inner", "ssm_state", "conv")

Axes = tuple[Optional[str], ...]

# ----------------------------------------------------------------------------- parameters
# Rows are (regex searched in the "/"-joined path, logical axes). First match wins.
# Kernels are Flax Dense layout [in, out]. Fused projections (GPT-2 c_attn [D, 3D], NeoX
# query_key_value [D, 3D], Mamba in_proj [D, 2*Di]) are named by their output axis.

_NORM = [
    (r"(^|/)(ln_\d|ln_f|input_layernorm|post_attention_layernorm|final_layer_norm|norm|norm_f|"
     r"ln_1|ln_2)/(scale|bias)$", ("embed",)),
]

_GPT2 = [
    (r"^wte$", ("vocab", "embed")),
    (r"^wpe$", (None, "embed")),
    *_NORM,
    (r"attn/c_attn/kernel$", ("embed", "heads")),
    (r"attn/c_attn/bias$", ("heads",)),
    (r"attn/c_proj/kernel$", ("heads", "embed")),
    (r"attn/c_proj/bias$", ("embed",)),
    (r"mlp/c_fc/kernel$", ("embed", "mlp")),
    (r"mlp/c_fc/bias$", ("mlp",)),
    (r"mlp/c_proj/kernel$", ("mlp", "embed")),
    (r"mlp/c_proj/bias$", ("embed",)),
    (r"^lm_head/kernel$", ("embed", "vocab")),
]

_GPT_NEOX = [
    (r"^embed_in$", ("vocab", "embed")),
    (r"^embed_in/embedding$", ("vocab", "embed")),
    *_NORM,
    (r"attention/query_key_value/kernel$", ("embed", "heads")),
    (r"attention/query_key_value/bias$", ("heads",)),
    (r"attention/dense/kernel$", ("heads", "embed")),
    (r"attention/dense/bias$", ("embed",)),
    (r"mlp/dense_h_to_4h/kernel$", ("embed", "mlp")),
    (r"mlp/dense_h_to_4h/bias$", ("mlp",)),
    (r"mlp/dense_4h_to_h/kernel$", ("mlp", "embed")),
    (r"mlp/dense_4h_to_h/bias$", ("embed",)),
    (r"^embed_out/kernel$", ("embed", "vocab")),
]

_LLAMA = [
    (r"^embed_tokens$", ("vocab", "embed")),
    (r"^embed_tokens/embedding$", ("vocab", "embed")),
    *_NORM,
    (r"self_attn/q_proj/kernel$", ("embed", "heads")),
    (r"self_attn/q_proj/bias$", ("heads",)),
    (r"self_attn/(k|v)_proj/kernel$", ("embed", "kv_heads")),
    (r"self_attn/(k|v)_proj/bias$", ("kv_heads",)),
    (r"self_attn/o_proj/kernel$", ("heads", "embed")),
    (r"self_attn/o_proj/bias$", ("embed",)),
    (r"mlp/(gate_proj|up_proj)/kernel$", ("embed", "mlp")),
    (r"mlp/(gate_proj|up_proj)/bias$", ("mlp",)),
    (r"mlp/down_proj/kernel$", ("mlp", "embed")),
    (r"mlp/down_proj/bias$", ("embed",)),
    (r"^lm_head/kernel$", ("embed", "vocab")),
]

_MAMBA = [
    (r"^(embeddings|embed_tokens|embedding)(/embedding)?$", ("vocab", "embed")),
    *_NORM,
    (r"mixer/in_proj/kernel$", ("embed", "d_inner")),
    (r"mixer/in_proj/bias$", ("d_inner",)),
    (r"mixer/conv1d/kernel$", ("conv", "d_inner")),  # depthwise conv taps [K, Di]
    (r"mixer/conv1d/bias$", ("d_inner",)),
    (r"mixer/x_proj/kernel$", ("d_inner", None)),  # [Di, dt_rank + 2N]
    (r"mixer/dt_proj/kernel$", (None, "d_inner")),  # [dt_rank, Di]
    (r"mixer/dt_proj/bias$", ("d_inner",)),
    (r"mixer/A_log$", ("d_inner", "ssm_state")),
    (r"mixer/D$", ("d_inner",)),
    (r"mixer/out_proj/kernel$", ("d_inner", "embed")),
    (r"mixer/out_proj/bias$", ("embed",)),
    (r"^lm_head/kernel$", ("embed", "vocab")),
]

# Workload parameter trees (SAEs, LoRA adapters) share the table so rules apply uniformly.
_SAE = [
    (r"(^|/)(W_enc|w_enc|enc|encoder)(/kernel)?$", ("embed", "latents")),
    (r"(^|/)(b_enc|encoder/bias|threshold|log_threshold|b_gate|b_mag|r_mag)$", ("latents",)),
    (r"(^|/)(W_dec|w_dec|dec|decoder)(/kernel)?$", ("latents", "embed")),
    (r"(^|/)(b_dec|decoder/bias)$", ("embed",)),
    (r"(^|/)fired_ago$", ("latents",)),
]

# Adapters are small and replicated (FSDP base + replicated adapters).
_LORA = [
    (r"(^|/)(a|A|lora_a|lora_A)$", (None, None)),
    (r"(^|/)(b|B|lora_b|lora_B)$", (None, None)),
]

PARAM_AXES: dict[str, list[tuple[str, Axes]]] = {
    "gpt2": _GPT2,
    "gpt_neox": _GPT_NEOX,
    "llama": _LLAMA,
    "mamba": _MAMBA,
    "sae": _SAE,
    "lora": _LORA,
}


def path_str(path: Sequence[Any]) -> str:
    """``"h_0/attn/c_attn/kernel"`` for a jax key path."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _axes_for_path(table_name: str, path: str, ndim: int, strict: bool = True) -> Axes:
    table = PARAM_AXES[table_name]
    if ndim == 0:
        return ()
    for pattern, axes in table:
        if re.search(pattern, path):
            if len(axes) != ndim:
                raise ValueError(
                    f"sharding table {table_name!r}: parameter {path!r} has {ndim} axes but row {pattern!r} "
                    f"names {len(axes)}: {axes}. Fix the row in jaxinterp/sharding/axes.py."
                )
            return tuple(axes)
    if not strict:
        return (None,) * ndim
    raise KeyError(
        f"sharding table {table_name!r} has no row for parameter {path!r} (rank {ndim}); add one to "
        f"PARAM_AXES[{table_name!r}] in jaxinterp/sharding/axes.py. Rows: {[p for p, _ in table]}"
    )


def param_axes(table_name: str, params: Any, strict: bool = True) -> Any:
    """Pytree of logical-axis tuples matching ``params`` (arrays or ShapeDtypeStructs).

    ``table_name`` is a model family (``model.family``) or ``"sae"`` / ``"lora"``. Scalars
    are replicated. ``strict=False`` replicates leaves no row matches (for whole training
    states: step counters, schedules, hyperparameters) instead of raising.
    """
    if table_name not in PARAM_AXES:
        raise KeyError(f"no sharding table {table_name!r}; tables: {sorted(PARAM_AXES)}")
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: _axes_for_path(table_name, path_str(path), len(jnp_shape(leaf)), strict), params)


def jnp_shape(leaf: Any) -> tuple:
    return tuple(getattr(leaf, "shape", ()))


# ----------------------------------------------------------------------------- activations

_RESID = ("batch", "seq", "embed")
_HEADS = ("batch", "seq", "heads", "head_dim")
_KV = ("batch", "seq", "kv_heads", "head_dim")
_ATTN = ("batch", "heads", "seq", "seq")
_MLP = ("batch", "seq", "mlp")
_INNER = ("batch", "seq", "d_inner")
_STATE = ("batch", "seq", "ssm_state")

# (regex on the site name, axes). First match wins.
SITE_AXES: list[tuple[str, Axes]] = [
    (r"^(embed|final_norm)$", _RESID),
    (r"\.(resid_pre|resid_mid|resid_post|ln1|ln2|norm|attn_out|mlp_out|mixer_out)$", _RESID),
    (r"\.attn\.(q|z)$", _HEADS),
    (r"\.attn\.(k|v)$", _KV),
    (r"\.attn\.(scores|pattern)$", _ATTN),
    (r"\.mlp\.(pre|post|gate|up)$", _MLP),
    (r"\.mixer\.(in_x|in_z|conv_out|ssm_in|delta|ssm_out|gate|gated)$", _INNER),
    (r"\.mixer\.(B|C)$", _STATE),
    (r"\.mixer\.ssm_state$", ("batch", "seq", "d_inner", "ssm_state")),
    (r"\.(sae\.)?(latents|features|acts)$", ("batch", "seq", "latents")),
]

LOGITS_AXES: Axes = ("batch", "seq", "vocab")
TOKENS_AXES: Axes = ("batch", "seq")


def site_axes(site: str, ndim: Optional[int] = None) -> Axes:
    """Logical axes of a site's activation (``[batch, seq, ...]``)."""
    for pattern, axes in SITE_AXES:
        if re.search(pattern, site):
            if ndim is not None and ndim != len(axes):
                raise ValueError(f"site {site!r} has {ndim} axes but its layout is {axes}")
            return axes
    raise KeyError(f"no activation layout for site {site!r}; add a row to SITE_AXES in jaxinterp/sharding/axes.py")


def fit_axes(axes: Axes, ndim: int, align: str) -> Axes:
    """The axes of an array that broadcasts against a site: a right-aligned suffix (values)
    or a left-aligned prefix (masks)."""
    if ndim > len(axes):
        raise ValueError(f"array of rank {ndim} does not fit a site with axes {axes}")
    if align == "right":
        return tuple(axes[len(axes) - ndim:])
    if align == "left":
        return tuple(axes[:ndim])
    raise ValueError(f"align must be 'left' or 'right', got {align!r}")
