"""Logical axis names for every parameter and every activation site.

One vocabulary for parameters, activations and sharding rules (see ``jaxinterp.sites``):

    batch, seq, embed, heads, kv_heads, head_dim, mlp, vocab, layers, latents,
    d_inner, ssm_state, conv

``None`` marks an axis that is never sharded (positions table, LoRA rank, a conv's
singleton channel axis, ...).

Parameter axes are derived from the parameter's path (``"layers/attn/q/kernel"``) with the
regex table its family declares (``Family.param_axes``); stacked per-layer parameters get the
``layers`` axis in front. A parameter that matches no row, or whose rank differs from the row's,
raises naming the parameter and the table: a silently replicated parameter is a memory bug on a
large model.

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

AXES = ("batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers", "experts", "latents",
        "d_inner", "ssm_state", "conv")

Axes = tuple[Optional[str], ...]

# ----------------------------------------------------------------------------- parameters
# A model family declares its rows (``Family.param_axes``: regex searched in the "/"-joined path,
# logical axes of one layer's parameter); parameters stacked under ``layers`` get the ``layers``
# axis in front. Kernels are Flax Dense layout [in, out]. Workload tables (SAEs, LoRA) live here.

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
    "sae": _SAE,
    "lora": _LORA,
}


def table_rows(table_name: str) -> list[tuple[str, Axes]]:
    """The rows of a workload table or of a registered model family."""
    if table_name in PARAM_AXES:
        return PARAM_AXES[table_name]
    from jaxinterp.families import families

    fams = families()
    if table_name not in fams:
        raise KeyError(f"no sharding table {table_name!r}; tables: {sorted(PARAM_AXES) + sorted(fams)}")
    return list(fams[table_name].param_axes)


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
    table = table_rows(table_name)
    if ndim == 0:
        return ()
    for pattern, axes in table:
        if re.search(pattern, path):
            if path.startswith("layers/") and len(axes) + 1 == ndim:
                axes = ("layers", *axes)
            if len(axes) != ndim:
                raise ValueError(
                    f"sharding table {table_name!r}: parameter {path!r} has {ndim} axes but row {pattern!r} "
                    f"names {len(axes)}: {axes}. Fix the row in the family's param_axes table."
                )
            return tuple(axes)
    if not strict:
        return (None,) * ndim
    raise KeyError(
        f"sharding table {table_name!r} has no row for parameter {path!r} (rank {ndim}); add one to the "
        f"family's param_axes table. Rows: {[p for p, _ in table][:40]}"
    )


def param_axes(table_name: str, params: Any, strict: bool = True) -> Any:
    """Pytree of logical-axis tuples matching ``params`` (arrays or ShapeDtypeStructs).

    ``table_name`` is a model family (``model.family``) or ``"sae"`` / ``"lora"``. Scalars
    are replicated. ``strict=False`` replicates leaves no row matches (for whole training
    states: step counters, schedules, hyperparameters) instead of raising.
    """
    table_rows(table_name)  # unknown tables fail here, naming the valid ones
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
    (r"\.(attn|mlp)\.out$", _RESID),  # raw projection outputs before a post-norm (sandwich / post placement)
    (r"\.moe\.router_logits$", ("batch", "seq", "experts")),
    (r"\.moe\.expert_out$", ("batch", "seq", "experts", "embed")),
    (r"\.attn\.(q|z)$", _HEADS),
    (r"\.attn\.(k|v)$", _KV),
    (r"\.attn\.(scores|pattern)$", _ATTN),
    (r"\.mlp\.(pre|post|gate|up)$", _MLP),
    # A per-head time step [B, T, H] (delta of SSD mixers) is split like d_inner: heads partition it.
    (r"\.mixer\.(in_x|in_z|conv_out|ssm_in|delta|ssm_out|gate|gated)$", _INNER),
    (r"\.mixer\.(B|C)$", _STATE),
    (r"\.mixer\.ssm_state$", ("batch", "seq", "d_inner", "ssm_state")),
    (r"\.mixer\.heads$", _HEADS),  # per-head scan output [B, T, H, P]
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
