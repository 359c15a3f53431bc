"""Workloads on a mesh: forward with captures and interventions, sharded sweeps (train steps on a
mesh: ``jaxinterp.train.make_train_step`` with state and batch shardings).

Every function here is the single-device program plus placement: the same ``ji.run``,
the same interventions, the same loss. Equality with the single-device result is what
``tests/sharding`` checks.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinterp.interventions import Patch
from jaxinterp.model import Model, RunOutput, run
from jaxinterp.sharding.place import (activation_constraint, constrain_logits, place_interventions, place_tokens)
from jaxinterp.sharding.rules import Rules, load_rules

__all__ = ["make_forward", "sharded_run", "sharded_map", "patching_sweep", "layer_position_masks",
           "sweep_axes_size"]

SWEEP_AXES = ("data", "fsdp")


def make_forward(mesh: Mesh, rules: Rules | str, capture=None, logits_at=None) -> Callable:
    """A jitted ``(model, tokens, interventions) -> RunOutput`` whose activations are sharded
    by ``rules`` at every site (captures come back sharded the same way)."""
    rules = load_rules(rules)
    constrain = activation_constraint(mesh, rules)

    @jax.jit
    def forward(model: Model, tokens, interventions) -> RunOutput:
        out = run(model, tokens, capture, interventions, logits_at=logits_at, constrain=constrain)
        return RunOutput(logits=constrain_logits(out.logits, mesh, rules), cache=out.cache)

    return forward


def sharded_run(model: Model, tokens, mesh: Mesh, rules: Rules | str, capture=None,
                interventions: Optional[Mapping[str, Any]] = None, logits_at=None) -> RunOutput:
    """``ji.run`` on a mesh: tokens and intervention arrays placed by the site layouts.

    ``model`` should already be placed (``shard_model`` / ``ji.load(..., mesh=...)``).
    """
    rules = load_rules(rules)
    tokens = place_tokens(tokens, mesh, rules)
    interventions = place_interventions(interventions or {}, model.sites, mesh, rules)
    return make_forward(mesh, rules, capture, logits_at)(model, tokens, interventions)


# ----------------------------------------------------------------------------- sweeps


def sweep_axes_size(mesh: Mesh, axes: Sequence[str] = SWEEP_AXES) -> int:
    return int(np.prod([mesh.shape[a] for a in axes]))


def _pad_leading(tree: Any, multiple: int) -> tuple[Any, int]:
    n = jax.tree_util.tree_leaves(tree)[0].shape[0]
    pad = -n % multiple

    def padded(x):
        x = np.asarray(x)
        if pad == 0:
            return x
        return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)  # repeat a real row

    return jax.tree_util.tree_map(padded, tree), n


def sharded_map(fn: Callable[[Any, Any], Any], shared: Any, items: Any, mesh: Mesh,
                axes: Sequence[str] = SWEEP_AXES, chunk_size: Optional[int] = None) -> Any:
    """``[fn(shared, item) for item in items]`` as one program, the item axis split over ``axes``.

    ``items`` is a pytree of arrays with a common leading axis N (prompts, interventions,
    ...). N is padded to a multiple of the sweep devices, each device maps over its slice
    (``lax.map`` in chunks of ``chunk_size`` items per device to bound memory, or one vmap),
    and the results come back to the host as numpy arrays of leading size N.
    """
    axes = tuple(axes)
    n_dev = sweep_axes_size(mesh, axes)
    items, n = _pad_leading(items, n_dev)
    sharding = NamedSharding(mesh, PartitionSpec(axes))
    items = jax.tree_util.tree_map(lambda x: _put_global(x, sharding), items)
    per_device = jax.tree_util.tree_leaves(items)[0].shape[0] // n_dev
    vfn = jax.vmap(fn, in_axes=(None, 0), spmd_axis_name=axes)

    @jax.jit
    def program(shared, items):
        if chunk_size is None or chunk_size >= per_device:
            out = vfn(shared, items)
        else:
            out = _chunked(vfn, shared, items, n_dev, per_device, chunk_size)
        return jax.tree_util.tree_map(lambda y: jax.lax.with_sharding_constraint(y, sharding), out)

    out = program(shared, items)
    return jax.tree_util.tree_map(lambda y: _to_host(y)[:n], out)


def _chunked(vfn, shared, items, n_dev, per_device, chunk_size):
    """Map over chunks of the per-device slice: [N] -> [n_chunks, n_dev * chunk] keeping each
    chunk spread over all devices."""
    n_chunks = -(-per_device // chunk_size)
    if per_device % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} must divide the {per_device} items per device")

    def split(x):  # [n_dev * per_device, ...] -> [n_chunks, n_dev * chunk, ...]
        x = x.reshape((n_dev, n_chunks, chunk_size) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape((n_chunks, n_dev * chunk_size) + x.shape[3:])

    def merge(y):
        y = y.reshape((n_chunks, n_dev, chunk_size) + y.shape[2:])
        return jnp.swapaxes(y, 0, 1).reshape((n_dev * per_device,) + y.shape[3:])

    out = jax.lax.map(lambda chunk: vfn(shared, chunk), jax.tree_util.tree_map(split, items))
    return jax.tree_util.tree_map(merge, out)


def _put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Place a host array that every process holds in full (deterministic inputs)."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _to_host(y: jax.Array) -> np.ndarray:
    if jax.process_count() == 1 or y.is_fully_addressable:
        return np.asarray(y)
    return np.asarray(multihost_utils.process_allgather(y, tiled=True))


def layer_position_masks(model: Model, seq_len: int, site_template: str = "blocks.{}.resid_pre",
                         layers: Optional[Sequence[int]] = None, positions: Optional[Sequence[int]] = None):
    """Masks for a (layer, position) patching sweep: ``{site: [N, 1, T] bool}`` with N = L * P.

    Item ``n = l_idx * P + p_idx`` patches only ``site_template.format(layers[l_idx])`` at
    ``positions[p_idx]``; every other site's mask is all false for that item.
    """
    n_layers = model.config.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    positions = list(range(seq_len)) if positions is None else list(positions)
    masks = {}
    for li, layer in enumerate(layers):
        m = np.zeros((len(layers), len(positions), 1, seq_len), bool)
        for pi, pos in enumerate(positions):
            m[li, pi, 0, pos] = True
        masks[site_template.format(layer)] = m.reshape(len(layers) * len(positions), 1, seq_len)
    return masks, (len(layers), len(positions))


def patching_sweep(model: Model, corrupt_tokens, clean_cache: Mapping[str, jax.Array],
                   masks: Mapping[str, np.ndarray], metric: Callable[[jax.Array], jax.Array], mesh: Mesh,
                   rules: Rules | str, axes: Sequence[str] = SWEEP_AXES, logits_at=None,
                   chunk_size: Optional[int] = None) -> np.ndarray:
    """Activation patching over N items at once, the item axis split over the mesh's ``axes``.

    Item n runs ``corrupt_tokens`` with ``Patch(clean_cache[site], masks[site][n])`` at every
    site in ``masks`` and returns ``metric(logits)``. Inside each item the activations are
    sharded by ``rules`` minus the sweep axes. Returns the metrics stacked, ``[N, ...]``.
    """
    rules = load_rules(rules)
    inner = rules.without(axes)
    constrain = activation_constraint(mesh, inner)
    tokens = jnp.asarray(corrupt_tokens)
    values = {s: jnp.asarray(clean_cache[s]) for s in masks}

    def one(shared, item_masks):
        model, tokens, values = shared
        ivs = {s: Patch(values=values[s], mask=item_masks[s]) for s in item_masks}
        out = run(model, tokens, interventions=ivs, logits_at=logits_at, constrain=constrain)
        return metric(out.logits)

    return sharded_map(one, (model, tokens, values), dict(masks), mesh, axes, chunk_size)
