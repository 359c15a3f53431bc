"""The model object: a pytree of parameters plus a static (family, config) description.

``Model`` is registered as a pytree whose leaves are the parameter arrays and whose
auxiliary data is the family name and the frozen config, so models pass through
``jit``/``vmap``/``grad``/sharding like any other argument. ``run`` is the single
entry point to the forward pass; it builds a fresh ``SiteContext`` per call.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinterp.sites import SiteContext

__all__ = ["Family", "Model", "RunOutput", "register_family", "get_family", "families", "run", "init"]

# Built-in port modules, imported lazily on first lookup (each calls register_family).
_BUILTIN_FAMILY_MODULES = {
    "gpt2": "jaxinterp.models.gpt2",
    "gpt_neox": "jaxinterp.models.gpt_neox",
    "llama": "jaxinterp.models.llama",
    "mamba": "jaxinterp.models.mamba",
}
_FAMILIES: dict[str, "Family"] = {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    """Everything jaxinterp needs to know about one architecture family.

    Attributes:
      name: family key (also the key used in ``Model``'s static data).
      config_cls: frozen config dataclass with ``from_hf(dict)`` / ``to_hf()``.
      module: ``config -> flax.linen.Module`` whose ``__call__(tokens, sites, logits_at=None)``
        returns logits.
      site_names: ``config -> tuple[str, ...]`` in forward order.
      from_hf: ``(config, {hf_name: np.ndarray}) -> params`` (refuses bad checkpoints).
      to_hf: ``(config, params) -> {hf_name: np.ndarray}`` (inverse of ``from_hf``).
      hf_model_types: config.json ``model_type`` values this family reads.
      param_axes: ``config -> pytree of logical axis-name tuples`` matching params (sharding).
      attn_out_weights: ``(config, params, layer) -> (W_O [H, Dh, D], bias [D] or None)``, the
        attention output projection per head (``attn_out = sum_h z_h W_O[h] + bias``); used by
        ``jaxinterp.heads`` for per-head contributions. None for attention-free families.
    """

    name: str
    config_cls: type
    module: Callable[[Any], Any]
    site_names: Callable[[Any], tuple[str, ...]]
    from_hf: Callable[[Any, Mapping[str, np.ndarray]], Any]
    to_hf: Callable[[Any, Any], dict[str, np.ndarray]]
    hf_model_types: tuple[str, ...]
    param_axes: Optional[Callable[[Any], Any]] = None
    attn_out_weights: Optional[Callable[[Any, Any, int], tuple]] = None


def register_family(family: Family) -> Family:
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    if name not in _FAMILIES and name in _BUILTIN_FAMILY_MODULES:
        importlib.import_module(_BUILTIN_FAMILY_MODULES[name])
    if name not in _FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known families: {sorted(set(_BUILTIN_FAMILY_MODULES) | set(_FAMILIES))}")
    return _FAMILIES[name]


def families() -> dict[str, Family]:
    """All families (imports the built-in ports that are present)."""
    for name, module in _BUILTIN_FAMILY_MODULES.items():
        if name not in _FAMILIES:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:  # a port not written yet
                if err.name != module:
                    raise
    return dict(_FAMILIES)


def family_for_config(config: Any) -> Family:
    for fam in families().values():
        if isinstance(config, fam.config_cls):
            return fam
    raise TypeError(f"no model family uses config type {type(config).__name__}")


@struct.dataclass
class RunOutput:
    """What ``run`` returns: ``logits [B, T, vocab]`` and ``cache`` {site: array}."""

    logits: jax.Array
    cache: dict


@functools.lru_cache(maxsize=None)
def _sites_for(family: str, config: Any) -> tuple[str, ...]:
    return tuple(get_family(family).site_names(config))


@jax.tree_util.register_pytree_node_class
class Model:
    """A loaded or initialised model: ``params`` (pytree leaves) + static ``config``."""

    def __init__(self, params: Any, config: Any, family: str):
        self.params = params
        self.config = config
        self.family = family

    # pytree protocol ---------------------------------------------------------------
    def tree_flatten(self):
        return (self.params,), (self.family, self.config)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], aux[1], aux[0])

    # public API ----------------------------------------------------------------------
    @property
    def sites(self) -> tuple[str, ...]:
        """Every site name this model exposes, in forward order."""
        return _sites_for(self.family, self.config)

    @property
    def module(self):
        return get_family(self.family).module(self.config)

    def run(self, tokens, capture=None, interventions=None, *, logits_at=None, constrain=None) -> RunOutput:
        return run(self, tokens, capture=capture, interventions=interventions, logits_at=logits_at,
                   constrain=constrain)

    def replace(self, params=None, config=None) -> "Model":
        return Model(self.params if params is None else params, self.config if config is None else config, self.family)

    def astype(self, dtype) -> "Model":
        dtype = jnp.dtype(dtype)
        cast = lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p
        return self.replace(params=jax.tree_util.tree_map(cast, self.params))

    def num_params(self) -> int:
        return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(self.params)))

    def __repr__(self) -> str:
        return f"Model(family={self.family!r}, params={self.num_params():,}, config={self.config})"


def _check_tokens(model: Model, tokens: jax.Array) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be an int array of shape [batch, seq], got shape {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integers, got dtype {tokens.dtype}")
    max_len = getattr(model.config, "max_seq_len", None)
    if max_len is not None and tokens.shape[1] > max_len:
        raise ValueError(
            f"sequence length {tokens.shape[1]} exceeds this model's context of {max_len} positions"
        )
    if not isinstance(tokens, jax.core.Tracer):
        values = np.asarray(tokens)
        vocab = model.config.vocab_size
        if values.size and (values.min() < 0 or values.max() >= vocab):
            bad = values[(values < 0) | (values >= vocab)]
            raise ValueError(
                f"token ids must lie in [0, {vocab}); got {bad[:5].tolist()}"
                + (" ..." if bad.size > 5 else "")
            )


def run(model: Model, tokens, capture=None, interventions=None, *, logits_at=None, constrain=None) -> RunOutput:
    """Forward pass with captures and interventions.

    Args:
      model: a ``Model``.
      tokens: int array ``[batch, seq]``.
      capture: site name, glob, list of them, or ``"all"``; captured values are the ones
        the rest of the network sees (after any intervention at that site).
      interventions: {site name or glob: intervention | callable | list of them}.
      logits_at: optional int or int array of positions; logits are computed only there
        (``[B, P, vocab]``), which saves the unembedding where only some positions are read.
      constrain: optional ``(site, x) -> x`` applied at every site (see ``SiteContext``); used by
        ``jaxinterp.sharding.activation_constraint`` to shard activations inside the forward.

    Returns:
      ``RunOutput(logits, cache)``.
    """
    tokens = jnp.asarray(tokens)
    _check_tokens(model, tokens)
    ctx = SiteContext(model.sites, capture, interventions, constrain=constrain)
    if logits_at is not None:
        logits_at = jnp.atleast_1d(jnp.asarray(logits_at, jnp.int32))
    logits = model.module.apply({"params": model.params}, tokens, ctx, logits_at=logits_at)
    return RunOutput(logits=logits, cache=dict(ctx.cache))


def init(config: Any, key: jax.Array | int = 0, dtype="float32") -> Model:
    """A randomly initialised model of the given config (the family is inferred)."""
    fam = family_for_config(config)
    if isinstance(key, int):
        key = jax.random.PRNGKey(key)
    sites = tuple(fam.site_names(config))
    tokens = jnp.zeros((1, 2), jnp.int32)
    params = fam.module(config).init(key, tokens, SiteContext(sites))["params"]
    return Model(params, config, fam.name).astype(dtype)
