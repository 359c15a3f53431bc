"""Placing parameters, activations and intervention arrays on a mesh by logical axes."""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinterp.model import Model
from jaxinterp.sharding.axes import LOGITS_AXES, TOKENS_AXES, fit_axes, param_axes, site_axes
from jaxinterp.sharding.rules import Rules, load_rules, resolve_spec
from jaxinterp.sites import resolve_sites

__all__ = [
    "param_specs",
    "param_shardings",
    "shard_tree",
    "shard_model",
    "activation_spec",
    "activation_constraint",
    "place_activation",
    "place_tokens",
    "place_interventions",
    "per_device_bytes",
    "estimate_per_device_bytes",
]

_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
              "float16": np.dtype(np.float16)}


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def param_specs(table: str, params: Any, rules: Rules | str, mesh: Optional[Mesh] = None,
                strict: bool = True) -> Any:
    """PartitionSpecs for ``params`` (pure rule without ``mesh``; fitted to shapes with it)."""
    rules = load_rules(rules)
    axes = param_axes(table, params, strict)
    mshape = dict(mesh.shape) if mesh is not None else None
    return jax.tree_util.tree_map(
        lambda ax, leaf: resolve_spec(ax, rules.params, np.shape(leaf) if mesh is not None else None, mshape),
        axes, params, is_leaf=_is_axes)


def param_shardings(table: str, params: Any, mesh: Mesh, rules: Rules | str, strict: bool = True) -> Any:
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(table, params, rules, mesh, strict),
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_tree(tree: Any, table: str, mesh: Mesh, rules: Rules | str, strict: bool = True) -> Any:
    """``device_put`` every leaf of a parameter tree (model, SAE, adapters) by its logical axes.

    ``strict=False`` for whole training states: leaves no table row names are replicated.
    """
    return jax.device_put(tree, param_shardings(table, tree, mesh, rules, strict))


def shard_model(model: Model, mesh: Mesh, rules: Rules | str) -> Model:
    """The same model with every parameter placed on ``mesh`` by the family's axis table."""
    return model.replace(params=shard_tree(model.params, model.family, mesh, rules))


# ----------------------------------------------------------------------------- loading


def _read_slice(array: np.ndarray, index: tuple, dtype: np.dtype) -> np.ndarray:
    """Read one shard's slice of a (memory-mapped) host array, cast to ``dtype``."""
    return np.asarray(np.asarray(array[index], dtype=np.float32), dtype=dtype)


def place_host_params(host_params: Any, table: str, mesh: Mesh, rules: Rules | str, dtype: str = "float32") -> Any:
    """Build sharded device arrays from host (memory-mapped) arrays, one shard slice at a time.

    Each device receives only its slice, read straight from the host array: no device ever
    holds a full parameter that the rules shard.
    """
    if dtype not in _NP_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_NP_DTYPES)}, got {dtype!r}")
    np_dtype = _NP_DTYPES[dtype]
    shardings = param_shardings(table, host_params, mesh, rules)

    def place(array, sharding):
        return jax.make_array_from_callback(tuple(array.shape), sharding,
                                            lambda index: _read_slice(array, index, np_dtype))

    return jax.tree_util.tree_map(place, host_params, shardings)


# ----------------------------------------------------------------------------- activations


def activation_spec(axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh, rules: Rules) -> PartitionSpec:
    return resolve_spec(axes, rules.activations, shape, dict(mesh.shape))


def activation_constraint(mesh: Mesh, rules: Rules | str) -> Callable[[str, jax.Array], jax.Array]:
    """A ``(site, x) -> x`` for ``run(..., constrain=)``: shards each site by its logical axes."""
    rules = load_rules(rules)

    @functools.lru_cache(maxsize=None)
    def sharding_for(site: str, shape: tuple) -> NamedSharding:
        return NamedSharding(mesh, activation_spec(site_axes(site, len(shape)), shape, mesh, rules))

    def constrain(site: str, x: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, sharding_for(site, tuple(x.shape)))

    return constrain


def constrain_logits(logits: jax.Array, mesh: Mesh, rules: Rules | str) -> jax.Array:
    rules = load_rules(rules)
    axes = LOGITS_AXES if logits.ndim == 3 else (LOGITS_AXES[0], LOGITS_AXES[-1])  # [B, T, V] or [B, V]
    spec = activation_spec(axes, logits.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, spec))


def place_activation(x, axes: Sequence[Optional[str]], mesh: Mesh, rules: Rules | str) -> jax.Array:
    rules = load_rules(rules)
    return jax.device_put(x, NamedSharding(mesh, activation_spec(tuple(axes), np.shape(x), mesh, rules)))


def place_tokens(tokens, mesh: Mesh, rules: Rules | str) -> jax.Array:
    return place_activation(jnp.asarray(tokens), TOKENS_AXES, mesh, rules)


def _leaf_align(path: Sequence[Any]) -> str:
    """Masks index a site's leading axes; every other array broadcasts right-aligned."""
    last = path[-1] if path else None
    name = getattr(last, "name", getattr(last, "key", None))
    return "left" if name == "mask" else "right"


def place_interventions(interventions: Mapping[str, Any], sites: Sequence[str], mesh: Mesh,
                        rules: Rules | str) -> dict[str, Any]:
    """Place every array leaf of every intervention with the sharding of the site it acts on.

    Values / means / vectors / noise are right-aligned suffixes of the site's axes and masks
    left-aligned prefixes, so ``Patch(values=clean_cache[site])`` is split exactly as the site
    is and patching never gathers a full activation onto one device.
    """
    rules = load_rules(rules)
    out = {}
    for pattern, item in interventions.items():
        targets = resolve_sites(pattern, sites)
        axes = site_axes(targets[0])

        def place(path, leaf):
            if not hasattr(leaf, "shape") or np.ndim(leaf) == 0:
                return leaf
            leaf_axes = fit_axes(axes, np.ndim(leaf), _leaf_align(path))
            # broadcast (size-1) dims stay replicated
            leaf_axes = tuple(a if s > 1 else None for a, s in zip(leaf_axes, np.shape(leaf)))
            return jax.device_put(leaf, NamedSharding(mesh, activation_spec(leaf_axes, np.shape(leaf), mesh, rules)))

        out[pattern] = jax.tree_util.tree_map_with_path(place, item)
    return out


# ----------------------------------------------------------------------------- memory


def per_device_bytes(tree: Any) -> dict[Any, int]:
    """Bytes each device holds of the arrays in ``tree`` (addressable shards)."""
    out: dict[Any, int] = collections.defaultdict(int)
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] += shard.data.nbytes
    return dict(out)


def shard_shape(shape: Sequence[int], spec: PartitionSpec, mesh_shape: Mapping[str, int]) -> tuple[int, ...]:
    out = []
    for dim, size in enumerate(shape):
        entry = spec[dim] if dim < len(spec) else None
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        div = int(np.prod([mesh_shape[n] for n in names])) if names else 1
        out.append(-(-size // div))
    return tuple(out)


def estimate_per_device_bytes(table: str, shapes: Any, rules: Rules | str, mesh_shape: Mapping[str, int],
                              dtype: str = "float32") -> dict[str, Any]:
    """Per-device parameter bytes from shapes alone (no devices needed): the dry-run estimate.

    Returns ``{"total_bytes", "per_device_bytes", "replicated": [paths of unsharded params]}``.
    """
    from jaxinterp.sharding.axes import path_str

    rules = load_rules(rules)
    itemsize = _NP_DTYPES[dtype].itemsize
    axes = param_axes(table, shapes)
    total = per_device = 0
    replicated = []
    flat_axes = jax.tree_util.tree_leaves(axes, is_leaf=_is_axes)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    for (path, leaf), ax in zip(flat, flat_axes):
        spec = resolve_spec(ax, rules.params, leaf.shape, mesh_shape)
        n = int(np.prod(leaf.shape))
        total += n * itemsize
        per_device += int(np.prod(shard_shape(leaf.shape, spec, mesh_shape))) * itemsize
        if all(e is None for e in spec) and n >= 1 << 16:
            replicated.append(path_str(path))
    return {"total_bytes": total, "per_device_bytes": per_device, "replicated_large": replicated}
