"""The model object: a pytree of parameters plus a static (family, config) description.

``Model`` is registered as a pytree whose leaves are the parameter arrays and whose auxiliary
data is the family name and the frozen config, so models pass through ``jit``/``vmap``/``grad``/
sharding like any other argument. ``run`` is the single entry point to the forward pass; it builds
a fresh ``SiteContext`` per call.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxinterp.families import Family, families, family_for_config, get_family, register_family
from jaxinterp.sites import SiteContext

__all__ = ["Family", "Model", "RunOutput", "register_family", "get_family", "families", "run", "init",
           "prepare_inputs", "forward"]

TOKEN_CHECKS = ("error", "clip")


@struct.dataclass
class RunOutput:
    """What ``run`` returns: ``logits`` (``[B, T, vocab]``, or at ``logits_at``) and ``cache`` (a ``Cache``:
    a read-only mapping {site: array})."""

    logits: jax.Array
    cache: dict


@functools.lru_cache(maxsize=None)
def _sites_for(family: str, config: Any) -> tuple[str, ...]:
    return tuple(get_family(family).site_names(config))


@jax.tree_util.register_pytree_node_class
class Model:
    """A loaded or initialised model: ``params`` (pytree leaves) + static ``config``.

    ``tokenizer`` (a ``jaxinterp.tokenizer.Tokenizer`` or None) and ``source`` are informative
    attributes carried alongside, not pytree data.
    """

    def __init__(self, params: Any, config: Any, family: str, tokenizer=None):
        self.params = params
        self.config = config
        self.family = family
        self.tokenizer = tokenizer

    # pytree protocol ---------------------------------------------------------------
    def tree_flatten(self):
        return (self.params,), (self.family, self.config, self.tokenizer)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], aux[1], aux[0], aux[2])

    # public API ----------------------------------------------------------------------
    @property
    def sites(self) -> tuple[str, ...]:
        """Every site name this model exposes, in forward order."""
        return _sites_for(self.family, self.config)

    @property
    def module(self):
        return get_family(self.family).module(self.config)

    def run(self, tokens, capture=None, interventions=None, *, attention_mask=None, positions=None, logits_at=None,
            constrain=None, token_check="error", stop_at=None) -> RunOutput:
        return run(self, tokens, capture=capture, interventions=interventions, attention_mask=attention_mask,
                   positions=positions, logits_at=logits_at, constrain=constrain, token_check=token_check,
                   stop_at=stop_at)

    def to_tokens(self, texts, *, padding_side: str = "left", add_bos: Optional[bool] = None):
        """``(tokens [B, T] int32, attention_mask [B, T] bool)`` for a string or a list of strings."""
        return self._require_tokenizer().encode_batch(texts, padding_side=padding_side, add_bos=add_bos)

    def to_str(self, ids) -> str | list[str]:
        """Text of a 1-D id sequence, or a list of texts for ``[B, T]``."""
        return self._require_tokenizer().decode(ids)

    def to_str_tokens(self, ids) -> list[str] | list[list[str]]:
        """Each token of a 1-D id sequence as a string (a list per row for ``[B, T]``)."""
        return self._require_tokenizer().token_strings(ids)

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (its checkpoint has no tokenizer.json); pass token ids")
        return self.tokenizer

    def replace(self, params=None, config=None) -> "Model":
        out = Model(self.params if params is None else params, self.config if config is None else config, self.family,
                    self.tokenizer)
        if hasattr(self, "source"):
            out.source = self.source
        return out

    def astype(self, dtype) -> "Model":
        dtype = jnp.dtype(dtype)
        cast = lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p  # noqa: E731
        return self.replace(params=jax.tree_util.tree_map(cast, self.params))

    def num_params(self) -> int:
        return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(self.params)))

    def __repr__(self) -> str:
        return f"Model(family={self.family!r}, params={self.num_params():,}, config={self.config})"


# ----------------------------------------------------------------------------- input checks


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _raise_from_device(bad, message: str):
    """Raise ``ValueError(message)`` when any element of the traced bool array ``bad`` is true at run
    time. Each device checks its own shard (``partitioned``), so a sharded batch needs no collective."""

    def check(values):
        # np.asarray first: np.any on a jax.Array calls its .any(), a jitted program, which waits for the
        # device that is running this callback's own program (a deadlock under multi-device runs)
        if np.any(np.asarray(values)):
            raise ValueError(message)

    jax.debug.callback(check, bad, partitioned=True)


def _check_int_range(values, low: int, high: int, what: str, mode: str):
    """``values`` within ``[low, high)``: eagerly where concrete, at run time (or clipped) where traced."""
    if not _is_traced(values):
        arr = np.asarray(values)
        if arr.size and (arr.min() < low or arr.max() >= high):
            bad = arr[(arr < low) | (arr >= high)]
            raise ValueError(f"{what} must lie in [{low}, {high}); got {bad[:5].tolist()}"
                             + (" ..." if bad.size > 5 else ""))
        return jnp.asarray(arr, jnp.int32)
    if mode == "clip":
        return jnp.clip(values, low, high - 1).astype(jnp.int32)
    _raise_from_device((values < low) | (values >= high),
                       f"{what} must lie in [{low}, {high}) (checked at run time under jit/vmap; "
                       f"token_check='clip' clamps instead)")
    return values.astype(jnp.int32)


def _as_int_array(x, what: str):
    """An integer array; 64-bit host inputs outside int32 are refused instead of wrapping."""
    if _is_traced(x) or isinstance(x, jax.Array):
        arr = x
    else:
        arr = np.asarray(x)
        if arr.dtype == object or arr.dtype.kind not in "iub":
            raise TypeError(f"{what} must be integers, got dtype {arr.dtype}")
        if arr.size and arr.dtype.itemsize > 4 and (arr.min() < -2**31 or arr.max() >= 2**31):
            raise ValueError(f"{what} contain values outside int32 ({arr.min()}..{arr.max()})")
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"{what} must be integers, got dtype {arr.dtype}")
    return arr


def prepare_inputs(model: Model, tokens, attention_mask=None, positions=None, logits_at=None,
                   token_check: str = "error"):
    """Validate and normalise ``run``'s inputs: ``(tokens, mask, positions, logits_at)``.

    Text (a string or a list of strings) is tokenized with the model's tokenizer (left padding),
    its mask used unless one is given. Positions default to Hugging Face's rule for padded batches
    (``cumsum(mask) - 1``, 1 where the mask is 0). ``logits_at``: an int (every row), an int array
    ``[B]`` (one position per row) or ``[B, P]``; negative values count from the end.
    """
    if token_check not in TOKEN_CHECKS:
        raise ValueError(f"token_check must be one of {TOKEN_CHECKS}, got {token_check!r}")
    if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str)):
        tokens, text_mask = model.to_tokens(tokens)
        attention_mask = text_mask if attention_mask is None else attention_mask
    tokens = _as_int_array(tokens, "tokens")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be an int array of shape [batch, seq], got shape {tuple(tokens.shape)}")
    b, t = tokens.shape
    max_len = getattr(model.config, "max_seq_len", None)
    if max_len is not None and t > max_len:
        raise ValueError(f"sequence length {t} exceeds this model's context of {max_len} positions")
    tokens = _check_int_range(tokens, 0, model.config.vocab_size, "token ids", token_check)
    mask = _prepare_mask(attention_mask, b, t)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if attention_mask is None else \
            jnp.where(mask, jnp.cumsum(mask, axis=1) - 1, 1).astype(jnp.int32)
    else:
        positions = _as_int_array(positions, "positions")
        if positions.ndim == 1:
            positions = positions[None]
        if positions.shape[-1] != t or positions.shape[0] not in (1, b):
            raise ValueError(f"positions must be [B, T] = [{b}, {t}] (or [T]), got {tuple(positions.shape)}")
        positions = jnp.broadcast_to(positions, (b, t))
        if max_len is not None:
            positions = _check_int_range(positions, 0, max_len, "positions", token_check)
    return tokens, mask, positions, _prepare_logits_at(logits_at, mask, b, t, token_check)


def _prepare_mask(attention_mask, b: int, t: int):
    if attention_mask is None:
        return jnp.ones((b, t), bool)
    if not hasattr(attention_mask, "shape"):
        attention_mask = np.asarray(attention_mask)
    if tuple(attention_mask.shape) != (b, t):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the tokens {(b, t)}")
    if not _is_traced(attention_mask):
        arr = np.asarray(attention_mask)
        if arr.dtype.kind not in "biu" or not np.isin(arr, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0/1 (or booleans)")
        empty = np.flatnonzero(~arr.astype(bool).any(axis=1))
        if empty.size:
            raise ValueError(f"attention_mask rows {empty[:5].tolist()} have no real token")
    return jnp.asarray(attention_mask).astype(bool)


def _prepare_logits_at(logits_at, mask, b: int, t: int, token_check: str):
    if logits_at is None:
        return None
    if isinstance(logits_at, (int, np.integer)):
        logits_at = np.full((b,), logits_at)
    logits_at = _as_int_array(logits_at, "logits_at")
    if logits_at.ndim == 0:  # a traced scalar: every row
        logits_at = jnp.broadcast_to(logits_at, (b,))
    if logits_at.ndim not in (1, 2) or logits_at.shape[0] != b:
        raise ValueError(f"logits_at must be an int, an int array [B] = [{b}] (one position per row) or [B, P]; "
                         f"got shape {tuple(logits_at.shape)}")
    logits_at = jnp.where(logits_at < 0, logits_at + t, logits_at) if _is_traced(logits_at) else \
        np.where(np.asarray(logits_at) < 0, np.asarray(logits_at) + t, np.asarray(logits_at))
    logits_at = _check_int_range(logits_at, 0, t, "logits_at positions", token_check)
    if not _is_traced(logits_at) and not _is_traced(mask):
        rows = np.arange(b).reshape((b,) + (1,) * (logits_at.ndim - 1))
        real = np.asarray(mask)[rows, np.asarray(logits_at)]
        if not real.all():
            raise ValueError("logits_at selects padding positions (attention_mask is 0 there); pick each row's "
                             "real tokens, e.g. its last one")
    return logits_at


# ----------------------------------------------------------------------------- forward


def forward(model: Model, tokens, ctx: SiteContext, *, positions, k_valid, logits_at=None, cache=None,
            write_index=0, remat=None, stop_at: Optional[int] = None):
    """The family module on prepared inputs: ``(logits, new cache)`` (generation and engines use it).

    ``stop_at``: run layers ``[0, stop_at)`` only (their stacked parameters sliced); logits None.
    """
    module = get_family(model.family).module(model.config)
    params = model.params
    if stop_at is not None:
        params = {**params, "layers": jax.tree_util.tree_map(lambda a: a[:stop_at], params["layers"])}
        module = module.clone(n_run=stop_at)
    if remat is not None:
        module = module.clone(remat=remat)
    return module.apply({"params": params}, tokens, ctx, positions=positions, k_valid=k_valid, logits_at=logits_at,
                        cache=cache, write_index=write_index)


def _check_stop_at(model: Model, stop_at, ctx: SiteContext) -> Optional[int]:
    if stop_at is None:
        return None
    n = model.config.n_layers
    if isinstance(stop_at, bool) or not isinstance(stop_at, (int, np.integer)) or not 1 <= stop_at <= n:
        raise ValueError(f"stop_at must be a layer count in [1, {n}], got {stop_at!r}")
    late = sorted(s for s in (*ctx.capture, *ctx.interventions)
                  if (s.startswith("blocks.") and int(s.split(".")[1]) >= stop_at) or s == "final_norm")
    if late:
        raise ValueError(f"stop_at={stop_at} runs layers 0..{stop_at - 1}, but {late[:3]} lie beyond it")
    return None if stop_at == n else int(stop_at)


def run(model: Model, tokens, capture=None, interventions=None, *, attention_mask=None, positions=None,
        logits_at=None, constrain=None, token_check: str = "error", adapters=None, remat=None,
        stop_at: Optional[int] = None) -> RunOutput:
    """Forward pass with captures and interventions.

    Args:
      model: a ``Model``.
      tokens: int array ``[batch, seq]``, or a string / list of strings (tokenized, left-padded).
      capture: site name, glob, list of them, or ``"all"``; captured values are the ones the rest
        of the network sees (after any intervention at that site).
      interventions: {site name or glob: intervention | callable | list of them}.
      attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding (left or right).
      positions: ``[B, T]`` position ids (default: from the mask as Hugging Face's ``generate``).
      logits_at: int (``[B, vocab]``), int array ``[B]`` (one position per row: ``[B, vocab]``) or
        ``[B, P]`` (``[B, P, vocab]``); the unembedding runs only there.
      constrain: optional ``(site, x) -> x`` applied at every site (sharding constraints).
      token_check: ``"error"`` (default: out-of-range tokens / positions raise, also under jit/vmap
        through a run-time check) or ``"clip"`` (clamp them under tracing; concrete inputs still raise).
      adapters: ``{projection: adapter}`` side paths (used by ``jaxinterp.lora``).
      remat: a rematerialisation policy name for training (see ``models.transformer.model.REMAT_POLICIES``).
      stop_at: run only layers ``0 .. stop_at - 1`` (harvesting early sites of a deep model); the
        output has ``logits=None`` and captures and interventions must lie in those layers.

    Returns:
      ``RunOutput(logits, cache)``.
    """
    tokens, mask, positions, logits_at = prepare_inputs(model, tokens, attention_mask, positions, logits_at,
                                                        token_check)
    ctx = SiteContext(model.sites, capture, interventions, constrain=constrain, adapters=adapters)
    stop_at = _check_stop_at(model, stop_at, ctx)
    logits, _ = forward(model, tokens, ctx, positions=positions, k_valid=mask, logits_at=logits_at, remat=remat,
                        stop_at=stop_at)
    return RunOutput(logits=logits, cache=ctx.result())


def abstract_params(config: Any) -> Any:
    """The params tree of ``config`` as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    fam = family_for_config(config)
    return jax.eval_shape(lambda: _init_params(fam, config, jax.random.PRNGKey(0)))


def _init_params(fam: Family, config: Any, key) -> Any:
    tokens = jnp.zeros((1, 2), jnp.int32)
    ctx = SiteContext(fam.site_names(config))
    return fam.module(config).init(key, tokens, ctx, positions=jnp.zeros((1, 2), jnp.int32),
                                   k_valid=jnp.ones((1, 2), bool))["params"]


def init(config: Any, key: jax.Array | int = 0, dtype="float32") -> Model:
    """A randomly initialised model of the given config (the family is inferred)."""
    fam = family_for_config(config)
    if isinstance(key, int):
        key = jax.random.PRNGKey(key)
    return Model(_init_params(fam, config, key), config, fam.name).astype(dtype)
