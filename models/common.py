"""Building blocks shared by the ports: activations, norms, rotary embeddings, the attention core,
and the two-way Hugging Face <-> Flax parameter mapping for layer-stacked parameters.

Activation layouts (the axis vocabulary of ``jaxinterp.sites``):
  residual stream            [B, T, D]          (batch, seq, embed)
  q / z                      [B, T, H, Dh]      (batch, seq, heads, head_dim)
  k / v                      [B, T, Hkv, Dh]    (batch, seq, kv_heads, head_dim), never repeated
  scores / pattern           [B, H, Tq, S]      S = keys seen (the cache length when decoding)
  mlp.pre / mlp.up / mlp.post [B, T, F]         (batch, seq, mlp)

Masks. Every call carries ``k_valid [B, S]`` (key slot holds a real token: padding and unwritten
cache slots are False) and ``q_index [Tq]`` (the slot index of each query). A query at slot ``q``
sees key slot ``s`` iff ``k_valid[s] and s <= q`` (and ``s > q - window`` with a sliding window):
causality by slot order, as Hugging Face masks by cache position. Positions fed to rotary or
learned position embeddings are separate (``positions [B, T]``, derived from the attention mask).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.hf import ConversionError, check_tensors
from jaxinterp.placement import HostPlacer, release

# ----------------------------------------------------------------------------- activations

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ConversionError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return name


INIT = nn.initializers.normal(0.02)

# ----------------------------------------------------------------------------- norms


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (params ``scale``, ``bias``)."""

    eps: float = 1e-5
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,))
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (d,)).astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (param ``scale``).

    ``offset`` = 1 gives Gemma's ``x_hat * (1 + scale)`` (computed in float32 before the cast, as
    Gemma does); ``offset`` = 0 is Llama's ``(x_hat in the input dtype) * scale``, or with
    ``scale_in_f32`` OLMo-2's ``(scale * x_hat in float32)`` cast afterwards.
    """

    eps: float = 1e-6
    offset: float = 0.0
    scale_in_f32: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],))
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
        if self.offset or self.scale_in_f32:  # Gemma (1 + w), OLMo-2 (w * x_hat in float32, then the cast)
            return (y * (self.offset + scale.astype(jnp.float32))).astype(x.dtype)
        return (y.astype(x.dtype) * scale.astype(x.dtype)).astype(x.dtype)


# ----------------------------------------------------------------------------- rotary


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rope:
    """Rotary position embedding of one attention layer kind.

    ``inv_freq``: the ``rotary_dim / 2`` inverse frequencies (after any static scaling such as
    ``linear`` or ``llama3``), as a tuple so the spec stays hashable; ``interleaved``: rotate pairs
    ``(x0, x1), (x2, x3), ...`` (GPT-J) instead of the two halves (``rotate_half``);
    ``attention_factor``: multiplies cos and sin (YaRN / LongRoPE magnitude correction).
    """

    inv_freq: tuple[float, ...]
    interleaved: bool = False
    attention_factor: float = 1.0
    # Length-dependent variants (transformers' ``dynamic_rope_update``). The length is that of the
    # call (``max(positions) + 1``), or what the caller passes (the incremental engine: its cache).
    # ``switch_len``: above it, dynamic NTK rescales theta and LongRoPE uses ``long_inv_freq``.
    switch_len: Optional[int] = None
    ntk_theta: Optional[float] = None
    ntk_factor: Optional[float] = None
    long_inv_freq: Optional[tuple[float, ...]] = None

    def __post_init__(self):
        if (self.ntk_factor is not None or self.long_inv_freq is not None) and self.switch_len is None:
            raise ValueError("dynamic NTK / LongRoPE need switch_len (the context the model was trained for)")
        if self.ntk_factor is not None and self.ntk_theta is None:
            raise ValueError("dynamic NTK needs ntk_theta (the unscaled rotary base)")
        if self.long_inv_freq is not None and len(self.long_inv_freq) != len(self.inv_freq):
            raise ValueError(f"long_inv_freq has {len(self.long_inv_freq)} entries, inv_freq {len(self.inv_freq)}")

    @property
    def rotary_dim(self) -> int:
        return 2 * len(self.inv_freq)

    @property
    def length_dependent(self) -> bool:
        return self.ntk_factor is not None or self.long_inv_freq is not None

    def inv_freq_at(self, length) -> jax.Array:
        """The ``rotary_dim / 2`` inverse frequencies for a call over ``length`` positions (float32)."""
        short = jnp.asarray(np.asarray(self.inv_freq, np.float32))
        if self.long_inv_freq is not None:  # LongRoPE: the long factors past the original context
            return jnp.where(length > self.switch_len, jnp.asarray(np.asarray(self.long_inv_freq, np.float32)), short)
        if self.ntk_factor is None:
            return short
        # Dynamic NTK: theta * ((factor * L / L0) - (factor - 1)) ** (d / (d - 2)), in float32 as transformers.
        d = self.rotary_dim
        n = jnp.maximum(jnp.asarray(length, jnp.float32), float(self.switch_len))
        base = self.ntk_theta * ((self.ntk_factor * n / self.switch_len) - (self.ntk_factor - 1)) ** (d / (d - 2))
        scaled = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
        return jnp.where(length > self.switch_len, scaled.astype(jnp.float32), short)

    @classmethod
    def default(cls, rotary_dim: int, theta: float, **kw) -> "Rope":
        return cls(inv_freq=tuple(default_inv_freq(rotary_dim, theta).tolist()), **kw)


def default_inv_freq(rotary_dim: int, theta: float) -> np.ndarray:
    """``1 / theta^(2j / rotary_dim)`` in float32, as Hugging Face computes it."""
    return (1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim))).astype(
        np.float32)


def rotary_tables(positions: jax.Array, rope: Rope, length=None) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[B, T, rotary_dim]`` for integer ``positions [B, T]``.

    ``length``: the sequence length a length-dependent rope (dynamic NTK, LongRoPE) scales for;
    default ``max(positions) + 1`` (transformers' rule for one forward call).
    """
    if rope.length_dependent:
        inv_freq = rope.inv_freq_at(jnp.max(positions) + 1 if length is None else length)
    else:
        inv_freq = jnp.asarray(np.asarray(rope.inv_freq, np.float32))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rd/2]
    if rope.interleaved:
        emb = jnp.repeat(freqs, 2, axis=-1)  # [B, T, rd]: f0 f0 f1 f1 ...
    else:
        emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, rd]: f0 f1 ... f0 f1 ...
    return jnp.cos(emb) * rope.attention_factor, jnp.sin(emb) * rope.attention_factor


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool = False) -> jax.Array:
    """Rotate the first ``cos.shape[-1]`` features of ``x [B, T, H, Dh]``; the rest pass through."""
    rd = cos.shape[-1]
    xr, xpass = x[..., :rd], x[..., rd:]
    xf = xr.astype(jnp.float32)
    if interleaved:
        pairs = xf.reshape(xf.shape[:-1] + (rd // 2, 2))
        rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
    else:
        half = rd // 2
        rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return jnp.concatenate([out.astype(x.dtype), xpass], axis=-1)


# ----------------------------------------------------------------------------- attention

NO_WINDOW = 1 << 30  # a "window" no sequence reaches: full causal attention


def attention_mask(q_index: jax.Array, k_valid: jax.Array, window=None) -> jax.Array:
    """Boolean ``[B, 1, Tq, S]``: query slot ``q_index[t]`` may read key slot ``s``."""
    s = jnp.arange(k_valid.shape[-1])
    allowed = s[None, :] <= q_index[:, None]  # [Tq, S]
    if window is not None:
        allowed &= s[None, :] > q_index[:, None] - window
    return allowed[None, None] & k_valid[:, None, None, :]


def attention_core(sites, q, k, v, mask, *, scale, softcap: Optional[float] = None) -> jax.Array:
    """Named attention over keys/values already extended by any cache; emits scores/pattern/z.

    q: ``[B, Tq, H, Dh]``; k, v: ``[B, S, Hkv, Dh]`` with ``H % Hkv == 0`` (grouped-query heads are
    handled by a reshape, never by repeating k/v); mask ``[B, 1, Tq, S]``. When neither
    ``attn.scores`` nor ``attn.pattern`` is observed (and no soft-capping is needed), the fused
    ``jax.nn.dot_product_attention`` runs instead (cuDNN / flash kernels on GPU); the results
    agree to float32 rounding. Scores are scaled, soft-capped where the model does, and masked with
    the dtype's minimum, so the pattern is exactly zero there; the softmax runs in float32.
    """
    b, t_q, n_heads, dh = q.shape
    n_kv, t_k = k.shape[2], k.shape[1]
    group = n_heads // n_kv
    if softcap is None and not (sites.wants("attn.scores") or sites.wants("attn.pattern")):
        z = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)  # [B, Tq, H, Dh]
        return sites("attn.z", z)
    qg = q.reshape(b, t_q, n_kv, group, dh)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k).reshape(b, n_heads, t_q, t_k)  # [B, H, Tq, S]
    scores = scores * jnp.asarray(scale, scores.dtype)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    scores = sites("attn.scores", scores)
    pattern = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    pattern = sites("attn.pattern", pattern)
    pg = pattern.reshape(b, n_kv, group, t_q, t_k)
    z = jnp.einsum("bkgqs,bskd->bqkgd", pg, v).reshape(b, t_q, n_heads, dh)  # [B, Tq, H, Dh]
    return sites("attn.z", z)


def write_cache(buffer: jax.Array, new: jax.Array, index) -> jax.Array:
    """``buffer [B, S, ...]`` with ``new [B, T, ...]`` written at slots ``[index, index + T)``."""
    return jax.lax.dynamic_update_slice_in_dim(buffer, new.astype(buffer.dtype), index, axis=1)


# ----------------------------------------------------------------------------- inputs


def gather_positions(x: jax.Array, logits_at) -> jax.Array:
    """``x [B, T, D]`` at ``logits_at``: None (all), ``[B]`` (one position per row) or ``[B, P]``."""
    if logits_at is None:
        return x
    if logits_at.ndim == 1:
        return jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]  # [B, D]
    return jnp.take_along_axis(x, logits_at[:, :, None], axis=1)  # [B, P, D]


# ----------------------------------------------------------------------------- HF mapping


def _identity(a):
    return (a,)


def _first(parts):
    return parts[0]


def _transpose(a):
    return (np.swapaxes(a, 0, 1),)


def _untranspose(parts):
    return np.swapaxes(parts[0], 0, 1)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One checkpoint tensor <-> one or more parameter arrays.

    ``hf``: the checkpoint name, with ``{i}`` for a per-layer tensor; per-layer parameters live
    under ``layers`` and are stacked on a leading axis. ``paths``: the parameter paths the tensor
    becomes (several for fused checkpoint tensors such as GPT-2's ``c_attn``). ``split`` maps the
    tensor to one array per path, ``join`` maps them back.
    """

    hf: str
    paths: tuple[tuple[str, ...], ...]
    split: Callable[[np.ndarray], tuple] = _identity
    join: Callable[[tuple], np.ndarray] = _first

    @property
    def layered(self) -> bool:
        return "{i}" in self.hf


def copy(hf: str, path: Sequence[str]) -> Entry:
    """Same layout in the checkpoint and the params."""
    return Entry(hf, (tuple(path),))


def linear(hf: str, path: Sequence[str]) -> Entry:
    """A torch ``Linear`` weight ``[out, in]`` <-> a Flax kernel ``[in, out]``."""
    return Entry(hf, (tuple(path),), _transpose, _untranspose)


def split_columns(hf: str, paths: Sequence[Sequence[str]], sizes: Sequence[int], transpose: bool) -> Entry:
    """A fused tensor whose output features concatenate ``sizes`` parts (GPT-2 c_attn, Phi-3 qkv)."""
    bounds = np.cumsum([0, *sizes])

    def split(a):
        a = np.swapaxes(a, 0, 1) if transpose else a
        return tuple(a[..., lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:]))

    def join(parts):
        a = np.concatenate(parts, axis=-1)
        return np.swapaxes(a, 0, 1) if transpose else a

    return Entry(hf, tuple(tuple(p) for p in paths), split, join)


def _get(tree: Mapping, path: Sequence[str]):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: Sequence[str], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _paths(tree) -> set[tuple[str, ...]]:
    return {tuple(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _layer_shape(shape: Sequence[int], layered: bool) -> tuple:
    return tuple(shape[1:]) if layered else tuple(shape)


def expected_hf_shapes(entries: Iterable[Entry], param_shapes: Any, n_layers: int) -> dict[str, tuple]:
    """Checkpoint name -> shape, from the parameter shapes alone (no allocation)."""
    out = {}
    for e in entries:
        probes = tuple(np.empty(_layer_shape(_get(param_shapes, p).shape, e.layered), np.uint8) for p in e.paths)
        shape = tuple(e.join(probes).shape)
        names = [e.hf.format(i=i) for i in range(n_layers)] if e.layered else [e.hf]
        out.update({n: shape for n in names})
    return out


def params_from_hf(model_type: str, entries: Iterable[Entry], param_shapes: Any, tensors: Mapping[str, np.ndarray],
                   n_layers: int, dtype=np.float32, ignorable: Iterable[str] = (),
                   rename: Callable[[str], str] | None = None, placer: HostPlacer | None = None) -> dict:
    """Build the (layer-stacked) params tree from checkpoint tensors, refusing missing, extra or
    mis-shaped ones. Each parameter is allocated once in ``dtype`` and filled layer by layer, so a
    bfloat16 checkpoint is never expanded to float32; each tensor's mapped pages are released once it
    has been read. ``placer`` decides where parameters live (``HostPlacer``: numpy; ``DevicePlacer``:
    on the device as they are read).

    ``param_shapes``: the params tree of ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` of the
    module's init), so expected checkpoint shapes follow from the config alone. ``rename`` maps
    checkpoint names onto the port's canonical ones.
    """
    entries = list(entries)
    renamed = {(rename(k) if rename else k): v for k, v in tensors.items()}
    covered = {p for e in entries for p in e.paths}
    all_paths = _paths(param_shapes)
    if covered != all_paths:  # a port bug: a parameter with no checkpoint tensor
        raise AssertionError(f"{model_type}: params without HF mapping: {sorted(all_paths - covered)}")
    check_tensors(model_type, expected_hf_shapes(entries, param_shapes, n_layers), renamed, ignorable)
    dtype = np.dtype(dtype)
    placer = placer or HostPlacer()
    params: dict = {}
    for e in entries:
        if not e.layered:
            source = renamed[e.hf]
            for path, part in zip(e.paths, e.split(source)):
                _set(params, path, placer.single(path, np.asarray(part, dtype=dtype)))
            release(source)
            continue
        bufs = [placer.stacked(p, _get(param_shapes, p).shape, dtype) for p in e.paths]
        for i in range(n_layers):
            source = renamed[e.hf.format(i=i)]
            bufs = [placer.set_layer(buf, i, np.asarray(part, dtype=dtype)) for buf, part in zip(bufs, e.split(source))]
            release(source)
        for path, buf in zip(e.paths, bufs):
            _set(params, path, buf)
    return params


def params_to_hf(entries: Iterable[Entry], params: Any, n_layers: int) -> dict[str, np.ndarray]:
    """Inverse of ``params_from_hf`` (export)."""
    out = {}
    for e in entries:
        arrays = [np.asarray(_get(params, p)) for p in e.paths]
        if not e.layered:
            out[e.hf] = np.asarray(e.join(tuple(arrays)))
            continue
        for i in range(n_layers):
            out[e.hf.format(i=i)] = np.ascontiguousarray(e.join(tuple(a[i] for a in arrays)))
    return out


def drop_tied_copy(model_type: str, tensors: dict, head: str, embed: str) -> None:
    """Drop an explicitly written copy of tied output embeddings, refusing one that differs."""
    if head not in tensors:
        return
    if embed in tensors and tensors[head].shape == tensors[embed].shape and np.array_equal(tensors[head], tensors[embed]):
        del tensors[head]
        return
    raise ConversionError(
        f"{model_type}: config ties the embeddings (tie_word_embeddings=true) but the checkpoint holds a "
        f"different {head!r}; set tie_word_embeddings=false to load it as a separate unembedding"
    )
