"""Layer-norm folding and centred writing weights (TransformerLens' ``fold_ln`` / ``center_writing_weights``).

``fold_layer_norm(model)`` returns an equivalent model (equal logits, to float rounding) on a
simpler basis:

* every pre-norm's gain ``g`` (and bias ``b``) moves into the linear maps that read it —
  ``W' = diag(g) W``, ``c' = c + b W`` — so ``blocks.{i}.ln1`` / ``ln2`` become pure normalisation
  (``(x - mean) / std`` for LayerNorm, ``x / rms`` for RMSNorm);
* the final norm's gain moves into the unembedding (a tied embedding is untied first, the config
  says ``tie_embeddings=False``); its bias goes into the unembedding's bias where the architecture
  has one, else it stays in the final norm divided by the gain (``b / g``, exact);
* with LayerNorm, the maps that write the residual stream (embeddings, attention output, MLP
  down projection) are centred (each written vector has mean zero). Every reader of the stream is
  a LayerNorm that subtracts the mean anyway, so nothing downstream changes, but the residual
  sites (``resid_pre/mid/post``, ``attn_out``, ``mlp_out``, ``embed``) now hold mean-free vectors.

The folded model is an ordinary ``Model``: its sites report activations on this folded basis.
Refused (one line naming why): families not on the shared transformer block, norms after a
sublayer (``sandwich``/``post`` placement: they normalise a sublayer's output before the residual
add, so no linear map follows them), a norm bias with no reader bias to absorb it, and
``centre=True`` with RMSNorm (which does not subtract the mean).
"""

from __future__ import annotations

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.attribution import _arch
from jaxinterp.families import get_family
from jaxinterp.model import Model, abstract_params

__all__ = ["fold_layer_norm"]

NORM_SITES = ("ln1", "ln2")


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path, value) -> dict:
    """A copy of nested dict ``tree`` with ``path`` set (the dicts along the path are copied)."""
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def _f64(a) -> np.ndarray:
    """Folding arithmetic runs in float64 on the host: one rounding per folded weight."""
    return np.asarray(a, np.float64)


def _like(a: np.ndarray, ref) -> jax.Array:
    return jnp.asarray(a.astype(ref.dtype))


def _check_foldable(model: Model, centre) -> tuple:
    arch = _arch(model, "fold_layer_norm")
    if arch.placement != "pre":
        raise ValueError(f"fold_layer_norm: placement {arch.placement!r} normalises each sublayer's output before the "
                         f"residual add; no linear map follows those norms, so they cannot be folded")
    if centre not in ("auto", True, False):
        raise ValueError(f"centre must be 'auto', True or False, got {centre!r}")
    if centre is True and arch.norm != "layernorm":
        raise ValueError(f"fold_layer_norm: centre=True needs LayerNorm readers; {arch.norm} does not subtract the "
                         f"mean, so centring the writing weights would change the output")
    return arch, arch.norm == "layernorm" and centre is not False


def _fold_block_norm(params: dict, arch, norm: str, readers) -> dict:
    """Move ``norm``'s gain and bias into the projections that read it; the norm becomes pure."""
    p = params["layers"][norm]
    gain = _f64(p["scale"]) + arch.norm_offset  # [L, D]
    bias = p.get("bias")
    for name, proj in readers.items():
        kernel = _get(params, proj.kernel)  # [L, D, O]
        if bias is not None:
            shift = np.einsum("ld,ldo->lo", _f64(bias), _f64(kernel))  # [L, O]
            if proj.bias is None:
                if np.any(shift != 0):
                    raise ValueError(f"fold_layer_norm: {norm} has a bias but {name} has none to absorb it "
                                     f"(this config has no {name} bias)")
            else:
                params = _set(params, proj.bias, _like(_f64(_get(params, proj.bias)) + shift, kernel))
        params = _set(params, proj.kernel, _like(gain[:, :, None] * _f64(kernel), kernel))
    params = _set(params, ("layers", norm, "scale"), jnp.full_like(p["scale"], 1.0 - arch.norm_offset))
    if bias is not None:
        params = _set(params, ("layers", norm, "bias"), jnp.zeros_like(bias))
    return params


def _untie(model: Model):
    """``(config, params)`` with the unembedding stored apart from the embedding (``lm_head``)."""
    try:
        config = dataclasses.replace(model.config, tie_embeddings=False)
    except TypeError:
        config = None
    if config is None or config.arch.tie_embeddings:
        raise ValueError(f"fold_layer_norm: the {model.family} config cannot untie its embeddings, which folding the "
                         f"final norm into the unembedding needs")
    params = {**model.params, "lm_head": {"kernel": model.params["embed"].T}}
    expected = jax.tree_util.tree_structure(abstract_params(config))
    if jax.tree_util.tree_structure(params) != expected:
        raise ValueError(f"fold_layer_norm: the untied {model.family} config expects parameters {expected}")
    return config, params


def _fold_final_norm(config, params: dict, arch) -> dict:
    p = params["final_norm"]
    gain = _f64(p["scale"]) + arch.norm_offset  # [D]
    kernel = params["lm_head"]["kernel"]  # [D, V]
    bias = p.get("bias")
    params = _set(params, ("lm_head", "kernel"), _like(gain[:, None] * _f64(kernel), kernel))
    params = _set(params, ("final_norm", "scale"), jnp.full_like(p["scale"], 1.0 - arch.norm_offset))
    if bias is None:
        return params
    if config.arch.lm_head_bias:
        shift = _f64(bias) @ _f64(kernel)  # [V]
        params = _set(params, ("lm_head", "bias"), _like(_f64(params["lm_head"]["bias"]) + shift, kernel))
        return _set(params, ("final_norm", "bias"), jnp.zeros_like(bias))
    b = _f64(bias)
    if np.any((gain == 0) & (b != 0)):
        raise ValueError("fold_layer_norm: the final norm has zero gains where its bias is non-zero and the "
                         "unembedding has no bias to absorb it")
    kept = np.where(gain == 0, 0.0, b / np.where(gain == 0, 1.0, gain))
    return _set(params, ("final_norm", "bias"), _like(kept, bias))  # (b / g) W' = b W


def _centre(params: dict, writers) -> dict:
    """Subtract each written vector's mean over the model dimension (the last axis)."""
    for path in writers:
        a = _get(params, path)
        params = _set(params, path, _like(_f64(a) - _f64(a).mean(-1, keepdims=True), a))
    return params


def fold_layer_norm(model: Model, *, centre: Union[str, bool] = "auto") -> Model:
    """An equivalent model with its norms folded into the adjacent weights (see the module docstring).

    ``centre``: ``"auto"`` centres the writing weights where every reader is a LayerNorm, ``True``
    insists (refused with RMSNorm), ``False`` skips it.
    """
    arch, do_centre = _check_foldable(model, centre)
    projections = get_family(model.family).projections(model.config)
    params = model.params
    for norm in NORM_SITES:
        readers = {k: p for k, p in projections.items() if p.in_site == norm}
        if readers and norm in params["layers"]:
            params = _fold_block_norm(params, arch, norm, readers)
    config = model.config
    if arch.tie_embeddings:
        config, params = _untie(model.replace(params=params))
    params = _fold_final_norm(config, params, arch)
    if do_centre:
        writers = [("embed",), *([("pos_embed",)] if "pos_embed" in params else [])]
        for name in ("attn.o", "mlp.down"):
            proj = projections[name]
            writers += [proj.kernel] + ([proj.bias] if proj.bias is not None else [])
        params = _centre(params, writers)
    return model.replace(params=params, config=config)
