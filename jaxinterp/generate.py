"""Generation with interventions: ``ji.generate(model, prompts, max_new_tokens=...)``.

One compiled program per shape bucket (batch, padded prompt width, new tokens) runs the whole
generation: a prefill of the left-padded prompts that fills the family's cache (keys and values
of every layer for transformers, convolution inputs and SSM state for Mamba), then a
``lax.while_loop`` of one-token decode steps that ends when every row has stopped. Nothing is
recompiled per token, and a new prompt of another length that pads to the same width reuses the
program.

Positions. The prompts are left-padded to a width ``P`` (a multiple of ``PROMPT_BUCKET``), so
column ``P + j`` of ``out.sequences`` holds new token ``j`` in every row. Interventions see every
site as it would be in one run over the whole ``[B, P + max_new_tokens]`` sequence: a position
mask or patch values index those columns (absolute positions), at the prefill and at every
decode step. Interventions that act position by position (every built-in one) therefore do
exactly what they would do in a full run; one that mixes positions would see zeros at the
positions not computed in the current step. ``prompt_batch`` gives the padded prompt arrays, and
so ``P``, before generating. ``ji.Steer(vector, scale, where="all"|"prompt"|"generated")`` tells
the prompt from the generated positions itself.

Sampling: ``temperature == 0`` is greedy; otherwise the logits are divided by ``temperature``,
filtered by ``top_k`` then ``top_p`` (Hugging Face's order and rules, see ``filter_logits``) and
token ``j`` is drawn with ``jax.random.categorical(fold_in(key, j), ...)`` over the batch, ``key``
being ``PRNGKey(seed)``: the same seed gives the same tokens.

Stopping: a row stops at the tokenizer's EOS token (``stop_at_eos``) or at a stop string (its
tokens are matched on the device, so the loop ends early) and, as text can be spelt with other
tokens, at the first new token whose decoded text contains the stop string (checked on the host).
The stop token or string is kept; later tokens are ``pad``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.families import get_family
from jaxinterp.interventions import ByLayer, Steer
from jaxinterp.model import Model, forward
from jaxinterp.sites import Cache, SiteContext, apply_intervention, resolve_sites, split_layer_site

__all__ = ["generate", "Generation", "GenerateConfig", "prompt_batch", "filter_logits", "empty_cache",
           "PROMPT_BUCKET"]

PROMPT_BUCKET = 8  # prompt widths are padded to a multiple of this (fewer compiled programs)
_ATTENTION_LAYOUT = ("attn.scores", "attn.pattern")  # [B, H, Tq, S]: time is axis 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """The sampling settings of ``generate``, validated.

    ``max_new_tokens`` >= 1; ``temperature`` >= 0 (0 = greedy); ``top_k`` None or >= 1;
    ``top_p`` None or in (0, 1]; ``stop_at_eos``: stop a row at the tokenizer's EOS token.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    stop_at_eos: bool = True

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, (int, np.integer)) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer))
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"top_p must be None or in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True)
class Generation:
    """What ``generate`` returns.

    Attributes:
      tokens: ``[B, N]`` int32 new tokens (``N = max_new_tokens``); ``pad`` after a row's stop.
      lengths: ``[B]`` new tokens kept per row (the stop token or string included).
      sequences: ``[B, P + N]`` the left-padded prompts followed by ``tokens``.
      attention_mask: ``[B, P + N]`` True at real prompt tokens and kept new tokens.
      text: each row's kept new tokens decoded (None without a tokenizer).
      cache: the captured sites at the positions that chose each new token, ``[B, N, ...]``
        (``[B, H, N, S]`` for ``attn.scores`` / ``attn.pattern``, ``S = P + N`` key slots): entry
        ``j`` is the site at column ``P - 1 + j`` of ``sequences``, as in a run over the whole
        sequence; zero past a row's length. None when nothing was captured.
      steps: forward passes run (the prefill and the decode steps; fewer than ``N`` when every row
        stopped early).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    sequences: np.ndarray
    attention_mask: np.ndarray
    text: Optional[list[str]]
    cache: Optional[Cache]
    steps: int


# ----------------------------------------------------------------------------- prompts


def _is_text(prompts) -> bool:
    return isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and len(prompts) > 0
                                        and all(isinstance(p, str) for p in prompts))


def _rows(prompts, attention_mask) -> list[np.ndarray]:
    """Each prompt's real token ids, in order (padding dropped wherever it sits)."""
    if isinstance(prompts, (list, tuple)) and prompts and not np.isscalar(prompts[0]) and attention_mask is None:
        rows = [np.asarray(p) for p in prompts]  # ragged token lists
    else:
        arr = np.asarray(prompts)
        arr = arr[None] if arr.ndim == 1 else arr
        if arr.ndim != 2:
            raise ValueError(f"token prompts must be [batch, seq] (or one [seq] row), got shape {arr.shape}")
        mask = np.ones(arr.shape, bool) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != arr.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}, the prompts {arr.shape}")
        if mask.dtype.kind not in "biu" or not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0/1 (or booleans)")
        rows = [a[m.astype(bool)] for a, m in zip(arr, mask)]
    for i, r in enumerate(rows):
        if r.ndim != 1 or (r.size and r.dtype.kind not in "iu"):
            raise TypeError(f"prompt {i} must be a 1-D sequence of integer token ids, got {r.dtype} {r.shape}")
    empty = [i for i, r in enumerate(rows) if r.size == 0]
    if empty:
        raise ValueError(f"prompts {empty[:5]} have no tokens")
    return rows


def prompt_batch(model: Model, prompts, attention_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """The left-padded ``(tokens [B, P], mask [B, P])`` that ``generate`` runs, ``P`` a multiple of
    ``PROMPT_BUCKET``. ``prompts``: a string or list of strings (the model's tokenizer), a list of
    token-id lists, or an int array ``[B, T]`` / ``[T]`` with an optional 0/1 ``attention_mask``
    (padding on either side)."""
    if _is_text(prompts):
        if attention_mask is not None:
            raise ValueError("attention_mask goes with token prompts; text is tokenized with its own mask")
        tokens, mask = model.to_tokens(prompts)
        prompts, attention_mask = tokens, mask
    rows = _rows(prompts, attention_mask)
    vocab = model.config.vocab_size
    for i, r in enumerate(rows):
        if r.min() < 0 or r.max() >= vocab:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): {r[(r < 0) | (r >= vocab)][:5].tolist()}")
    width = -(-max(len(r) for r in rows) // PROMPT_BUCKET) * PROMPT_BUCKET
    tokens = np.full((len(rows), width), _pad_id(model), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):], mask[i, width - len(r):] = r, True
    return tokens, mask


def _pad_id(model: Model) -> int:
    """The id written at padding and after a row's stop: the tokenizer's pad (else EOS, else 0)."""
    tok = model.tokenizer
    return 0 if tok is None else next((i for i in (tok.pad_id, tok.eos_id) if i is not None), 0)


def _check_context(model: Model, mask: np.ndarray, n_new: int) -> None:
    max_len = getattr(model.config, "max_seq_len", None)
    longest = int(mask.sum(1).max())
    if max_len is not None and longest + n_new > max_len:
        raise ValueError(f"max_new_tokens={n_new} after a prompt of {longest} tokens runs past this model's context "
                         f"of {max_len} positions (at most {max(max_len - longest, 0)} new tokens)")


# ----------------------------------------------------------------------------- stopping


def _stop_ids(model: Model, stop, stop_at_eos: bool) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
    """``(token sequences matched on the device, strings also checked on the text)``."""
    items = [] if stop is None else [stop] if isinstance(stop, (str, int, np.integer)) else list(stop)
    tok = model.tokenizer
    seqs, strings = [], []
    for s in items:
        if isinstance(s, (int, np.integer)) and not isinstance(s, bool):
            if not 0 <= s < model.config.vocab_size:
                raise ValueError(f"stop token id {s} outside the vocabulary [0, {model.config.vocab_size})")
            seqs.append((int(s),))
            continue
        if not isinstance(s, str):
            raise TypeError(f"stop must be strings or token ids, got {type(s).__name__}: {s!r:.60}")
        if tok is None:
            raise ValueError(f"stop string {s!r} needs a tokenizer, and this model has none; pass stop token ids")
        ids = tok.encode(s, add_bos=False) if s else []
        if not ids or s.strip() not in tok.decode(ids):
            raise ValueError(f"stop string {s!r} cannot be tokenized by this model's tokenizer (it encodes to "
                             f"{ids} = {tok.decode(ids) if ids else ''!r})")
        seqs.append(tuple(int(i) for i in ids))
        strings.append(s)
    if stop_at_eos and tok is not None and tok.eos_id is not None:
        seqs.append((int(tok.eos_id),))
    return tuple(dict.fromkeys(seqs)), tuple(strings)


def _stop_table(seqs) -> tuple[np.ndarray, np.ndarray]:
    """Stop sequences right-aligned in ``[S, M]`` (ids, and which entries count); both sizes
    rounded up to a multiple of 4, so other stops rarely need another compiled program."""
    up = lambda n: -(-max(n, 1) // 4) * 4  # noqa: E731
    width = up(max((len(s) for s in seqs), default=1))
    ids = np.zeros((up(len(seqs)), width), np.int32)
    care = np.zeros(ids.shape, bool)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], care[i, width - len(s):] = s, True
    return ids, care


def _stopped(tail, ids, care):
    """``[B]``: the last generated tokens ``tail [B, M]`` end with one of the stop sequences."""
    hit = (tail[:, None, :] == ids[None]) | ~care[None]  # [B, S, M]
    return jnp.any(jnp.all(hit, -1) & jnp.any(care, -1)[None], -1)


def _truncate_at_strings(model: Model, tokens: np.ndarray, lengths: np.ndarray, strings, pad: int) -> None:
    """Cut each row at the first new token whose text completes a stop string (in place)."""
    tok = model.tokenizer
    for b in range(tokens.shape[0]):
        n = int(lengths[b])
        if not any(s in tok.decode(tokens[b, :n]) for s in strings):
            continue
        k = next(k for k in range(1, n + 1) if any(s in tok.decode(tokens[b, :k]) for s in strings))
        lengths[b] = k
        tokens[b, k:] = pad


# ----------------------------------------------------------------------------- sampling


def filter_logits(logits: jax.Array, top_k: Optional[int] = None, top_p=None) -> jax.Array:
    """Logits ``[..., V]`` outside the sampled set set to ``-inf``, as Hugging Face's warpers.

    ``top_k``: keep the ``k`` largest (and any tied with the k-th). ``top_p``: keep the most likely
    tokens until their probability reaches ``top_p`` (the token that crosses it included, at least
    one token): a token is kept when the probability of the tokens ranked above it is < ``top_p``.
    ``top_k`` applies first.
    """
    x = logits.astype(jnp.float32)
    if top_k is not None and top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if top_p is not None:
        order = jnp.argsort(-x, axis=-1)  # descending
        ranked = jnp.take_along_axis(x, order, axis=-1)
        probs = jax.nn.softmax(ranked, axis=-1)
        above = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
        keep_ranked = above < top_p
        keep = jnp.zeros_like(keep_ranked)
        keep = jnp.put_along_axis(keep, order, keep_ranked, axis=-1, inplace=False)
        x = jnp.where(keep, x, -jnp.inf)
    return x


def _choose(logits, key, step, cfg: GenerateConfig, temperature, top_p):
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = filter_logits(logits.astype(jnp.float32) / temperature, cfg.top_k, None if cfg.top_p is None else top_p)
    return jax.random.categorical(jax.random.fold_in(key, step), x, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- cache


def empty_cache(model: Model, batch: int, length: int):
    """The family's cache for ``batch`` sequences of up to ``length`` tokens, zeroed.

    Its layout comes from the family's stepper: ``prefix_state`` maps one layer's
    ``state_sites`` to the state that layer continues from, which is the module's cache entry;
    stacked over layers here.
    """
    stepper = get_family(model.family).stepper
    if stepper is None:
        raise ValueError(f"family {model.family!r} declares no stepper, which generation needs for its cache layout")
    names = [f"blocks.*.{s}" for s in stepper.state_sites]
    shape = (batch, length)

    def captures(params):
        ctx = SiteContext(model.sites, names)
        forward(model.replace(params=params), jnp.zeros(shape, jnp.int32), ctx,
                positions=jnp.zeros(shape, jnp.int32), k_valid=jnp.ones(shape, bool))
        return {s: ctx.result().stacked(s)[0] for s in stepper.state_sites}  # one layer's [B, T, ...]

    per_layer = jax.eval_shape(lambda c: stepper.prefix_state(model.config, c, 0),
                               jax.eval_shape(captures, model.params))
    n = model.config.n_layers
    return jax.tree_util.tree_map(lambda s: jnp.zeros((n, *s.shape), s.dtype), per_layer)


# ----------------------------------------------------------------------------- interventions


def _time_axis(site: str) -> int:
    return 2 if site.endswith(_ATTENTION_LAYOUT) else 1


class _Window:
    """An intervention applied to the whole sequence during one step: the step's positions
    ``[start, start + t)`` sit in a zero ``[..., total, ...]`` buffer along the site's time axis,
    the intervention sees the buffer, and the step's positions come back."""

    def __init__(self, item, start, total: int, axis: int, site: str):
        self.item, self.start, self.total, self.axis, self.site = item, start, total, axis, site

    def apply(self, x):
        shape = list(x.shape)
        shape[self.axis] = self.total
        buf = jax.lax.dynamic_update_slice_in_dim(jnp.zeros(shape, x.dtype), x, self.start, self.axis)
        y = apply_intervention(self.item, buf, self.site)
        return jax.lax.dynamic_slice_in_dim(y, self.start, x.shape[self.axis], self.axis)


class _LayerWindow:
    """``_Window`` of a ``ByLayer`` item: the layer picks its slice first."""

    def __init__(self, item: ByLayer, *window):
        self.item, self.window = item, window

    def at_layer(self, layer):
        return _Window(self.item.at_layer(layer), *self.window)

    def apply(self, x):  # pragma: no cover - the site context slices it first
        raise TypeError("ByLayer acts on per-layer sites (blocks.*.<site>)")


def _for_generation(item, prompt_len: int):
    """``Steer`` items (also inside ``ByLayer``) told where the prompt ends."""
    if isinstance(item, Steer):
        return item.generating(prompt_len)
    if isinstance(item, ByLayer) and isinstance(item.item, Steer):
        return ByLayer(item.item.generating(prompt_len))
    return item


def _keys_by_axis(pattern: str, sites: Sequence[str], n_layers: int) -> list[tuple[str, int]]:
    """``pattern`` as mapping keys whose sites share one time axis: a suffix matched at every layer
    stays one glob (the scanned layers apply it unconditionally), others are listed by name."""
    by_suffix: dict[str, list[str]] = {}
    keys = []
    for name in resolve_sites(pattern, sites):
        layer, suffix = split_layer_site(name)
        if layer is None:
            keys.append(name)
        else:
            by_suffix.setdefault(suffix, []).append(name)
    for suffix, names in by_suffix.items():
        keys += [f"blocks.*.{suffix}"] if len(names) == n_layers else names
    return [(k, _time_axis(k)) for k in keys]


def _windowed(interventions: Optional[Mapping[str, Any]], model: Model, start, total: int, prompt_len: int):
    """The interventions of one step: every item sees the whole sequence (see ``_Window``)."""
    if not interventions:
        return None
    out: dict[str, list] = {}
    for pattern, value in interventions.items():
        for key, axis in _keys_by_axis(pattern, model.sites, model.config.n_layers):
            for item in (value if isinstance(value, (list, tuple)) else [value]):
                item = _for_generation(item, prompt_len)
                window = (start, total, axis, key)
                out.setdefault(key, []).append(_LayerWindow(item, *window) if isinstance(item, ByLayer)
                                               else _Window(item, *window))
    return out


def _check_interventions(interventions, model: Model) -> None:
    if interventions is None:
        return
    if not isinstance(interventions, Mapping):
        raise TypeError(f"interventions must be a mapping {{site or glob: intervention}}, got "
                        f"{type(interventions).__name__}")
    SiteContext(model.sites, None, interventions)  # unknown sites, bad items: the usual errors, eagerly


def _split_static(tree):
    """Array leaves (program inputs) and the rest (plain callables: part of the program)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    is_array = [isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex)) and not isinstance(x, bool)
                for x in leaves]
    arrays = [x if a else None for x, a in zip(leaves, is_array)]
    static = tuple(None if a else x for x, a in zip(leaves, is_array))
    return arrays, (treedef, static)


def _join_static(arrays, static):
    treedef, rest = static
    return jax.tree_util.tree_unflatten(treedef, [a if s is None else s for a, s in zip(arrays, rest)])


# ----------------------------------------------------------------------------- the program


@dataclasses.dataclass(frozen=True)
class _Spec:
    cfg: GenerateConfig
    capture: tuple[str, ...]
    interventions: Any  # (treedef, static leaves)
    pad: int


def _step(model, tokens, positions, k_valid, cache, write_index, logits_at, interventions, capture):
    ctx = SiteContext(model.sites, capture or None, interventions)
    logits, cache = forward(model, tokens, ctx, positions=positions, k_valid=k_valid, logits_at=logits_at,
                            cache=cache, write_index=write_index)
    return logits, cache, ctx


def _captured(ctx: SiteContext, index: int) -> dict[str, jax.Array]:
    """One column (``index`` along each site's time axis) of a step's captures, keyed
    ``name`` (flat) or ``*suffix`` (stacked over layers)."""
    take = lambda a, axis: jax.lax.index_in_dim(a, index, axis, keepdims=True)  # noqa: E731
    out = {name: take(a, _time_axis(name)) for name, a in ctx.cache.items()}
    out.update({f"*{suffix}": take(a, 1 + _time_axis(suffix)) for suffix, a in ctx.stacked.items()})
    return out


def _write_captures(buffers, column: dict, j):
    return {k: jax.lax.dynamic_update_slice_in_dim(buffers[k], column[k].astype(buffers[k].dtype), j,
                                                   _time_axis(k) + k.startswith("*"))
            for k in buffers}


def _capture_buffers(column: dict, n_new: int):
    def grow(k, a):
        shape = list(a.shape)
        shape[_time_axis(k) + k.startswith("*")] = n_new
        return jnp.zeros(shape, a.dtype)

    return {k: grow(k, a) for k, a in column.items()}


def _mask_captures(buffers, lengths):
    """Zero every capture past its row's length."""
    out = {}
    for k, a in buffers.items():
        axis = _time_axis(k) + k.startswith("*")
        batch_axis = int(k.startswith("*"))
        keep = jnp.arange(a.shape[axis])[None, :] < lengths[:, None]  # [B, N]
        shape = [1] * a.ndim
        shape[batch_axis], shape[axis] = a.shape[batch_axis], a.shape[axis]
        out[k] = jnp.where(keep.reshape(shape), a, jnp.zeros((), a.dtype))
    return out


@functools.partial(jax.jit, static_argnames=("spec",))
def _program(model, tokens, mask, arrays, key, temperature, top_p, stop_ids, stop_care, spec: _Spec):
    cfg, n_new = spec.cfg, spec.cfg.max_new_tokens
    b, p = tokens.shape
    total = p + n_new
    interventions = _join_static(arrays, spec.interventions)
    real = mask.sum(1).astype(jnp.int32)  # [B] prompt tokens per row
    k_valid = jnp.concatenate([mask, jnp.ones((b, n_new), bool)], axis=1)  # [B, P + N]
    positions = jnp.where(mask, jnp.cumsum(mask, axis=1) - 1, 1).astype(jnp.int32)
    choose = lambda logits, j: _choose(logits, key, j, cfg, temperature, top_p)  # noqa: E731

    logits, cache, ctx = _step(model, tokens, positions, k_valid, empty_cache(model, b, total), 0,
                               jnp.full((b,), p - 1), _windowed(interventions, model, 0, total, p), spec.capture)
    first = choose(logits, 0)
    captures = _capture_buffers(_captured(ctx, p - 1), n_new)
    captures = _write_captures(captures, _captured(ctx, p - 1), 0)
    tail = jnp.full((b, stop_ids.shape[1]), -1, jnp.int32).at[:, -1].set(first)
    done = _stopped(tail, stop_ids, stop_care)
    out = jnp.full((b, n_new), spec.pad, jnp.int32).at[:, 0].set(first)
    lengths = jnp.where(done, 1, n_new).astype(jnp.int32)

    def cond(state):
        j, _, done, *_ = state
        return (j < n_new) & ~jnp.all(done)

    def body(state):
        j, prev, done, lengths, cache, out, tail, captures = state
        w = p + j - 1  # the column of the token fed in
        logits, cache, ctx = _step(model, prev[:, None], (real + j - 1)[:, None], k_valid, cache, w,
                                   jnp.zeros((b,), jnp.int32), _windowed(interventions, model, w, total, p),
                                   spec.capture)
        new = jnp.where(done, spec.pad, choose(logits, j))
        tail = jnp.concatenate([tail[:, 1:], new[:, None]], axis=1)
        stops = ~done & _stopped(tail, stop_ids, stop_care)
        lengths = jnp.where(stops, j + 1, lengths)
        captures = _write_captures(captures, _captured(ctx, 0), j)
        return j + 1, new, done | stops, lengths, cache, out.at[:, j].set(new), tail, captures

    state = (jnp.asarray(1, jnp.int32), first, done, lengths, cache, out, tail, captures)
    steps, _, _, lengths, _, out, _, captures = jax.lax.while_loop(cond, body, state)
    return out, lengths, _mask_captures(captures, lengths), steps


def _as_cache(buffers: dict, model: Model) -> Optional[Cache]:
    if not buffers:
        return None
    flat = {k: v for k, v in buffers.items() if not k.startswith("*")}
    stacked = {k[1:]: v for k, v in buffers.items() if k.startswith("*")}
    have = set(flat) | {f"blocks.{i}.{s}" for s in stacked for i in range(model.config.n_layers)}
    return Cache(flat, stacked, [s for s in model.sites if s in have])


# ----------------------------------------------------------------------------- public


def generate(model: Model, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, stop=None, seed=0, interventions=None, capture=None,
             attention_mask=None, stop_at_eos: bool = True) -> Generation:
    """Continue each prompt by up to ``max_new_tokens`` tokens (see the module docstring).

    Args:
      model: a ``Model`` of any family with a stepper (every built-in one).
      prompts: a string or list of strings (the model's tokenizer), a list of token-id lists, or
        an int array ``[B, T]`` (with ``attention_mask`` for padding on either side).
      max_new_tokens: new tokens per row; the longest prompt plus these must fit the context.
      temperature, top_k, top_p: sampling (``temperature=0``: greedy; ``filter_logits``).
      stop: a string, a token id, or a list of them; a row stops after producing one.
      seed: an int or a ``jax.random`` key: the same seed gives the same tokens.
      interventions: ``{site or glob: intervention}`` applied at every step, positions absolute
        (columns of ``out.sequences``); ``ji.Steer`` for steering.
      capture: sites to record at the positions that chose each new token (``out.cache``).
      stop_at_eos: stop a row at the tokenizer's EOS token.
    """
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
                         top_p=None if top_p is None else float(top_p), stop_at_eos=stop_at_eos)
    tokens, mask = prompt_batch(model, prompts, attention_mask)
    _check_context(model, mask, cfg.max_new_tokens)
    seqs, strings = _stop_ids(model, stop, cfg.stop_at_eos)
    _check_interventions(interventions, model)
    arrays, static = _split_static(interventions)
    pad = _pad_id(model)
    spec = _Spec(cfg, tuple(resolve_sites(capture, model.sites)), static, pad)
    stop_ids, stop_care = _stop_table(seqs)
    key = seed if isinstance(seed, jax.Array) else jax.random.PRNGKey(int(seed))
    out, lengths, captures, steps = _program(model, jnp.asarray(tokens), jnp.asarray(mask), arrays, key,
                                             jnp.float32(max(cfg.temperature, 1e-6)),
                                             jnp.float32(1.0 if cfg.top_p is None else cfg.top_p),
                                             jnp.asarray(stop_ids), jnp.asarray(stop_care), spec=spec)
    new, lengths = np.array(out), np.array(lengths)
    if strings:
        _truncate_at_strings(model, new, lengths, strings, pad)
        captures = _mask_captures(captures, jnp.asarray(lengths))
    kept = np.arange(cfg.max_new_tokens)[None] < lengths[:, None]
    text = None if model.tokenizer is None else [model.tokenizer.decode(r[:n]) for r, n in zip(new, lengths)]
    return Generation(tokens=new, lengths=lengths, sequences=np.concatenate([tokens, new], axis=1),
                      attention_mask=np.concatenate([mask, kept], axis=1), text=text,
                      cache=_as_cache(captures, model), steps=int(steps))
