"""Building blocks shared by the ports: norms, rotary, the attention core, and the
two-way Hugging Face <-> Flax parameter mapping.

Activation layouts (the axis vocabulary of ``jaxinterp.sites``):
  residual stream            [B, T, D]          (batch, seq, embed)
  q / k / v / z              [B, T, H, Dh]      (batch, seq, heads, head_dim); k/v have
                                                the model's kv heads under GQA/MQA
  scores / pattern           [B, H, Tq, Tk]
  mlp.pre / mlp.post         [B, T, F]          (batch, seq, mlp)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.hf import ConversionError, check_tensors

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


# ----------------------------------------------------------------------------- rotary config

_ROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}

def read_rope(model_type: str, d: Mapping[str, Any], *, default_theta: float = 10000.0,
              default_factor: float = 1.0, legacy_theta: str = "rope_theta",
              legacy_factor: str = "partial_rotary_factor") -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from an HF config, refusing non-default rope types.

    Accepts the transformers-5 ``rope_parameters`` dict, the older ``rope_scaling`` dict (``None``
    or the default type), and top-level legacy fields (``rope_theta``, or NeoX's
    ``rotary_emb_base``/``rotary_pct`` passed as ``legacy_theta``/``legacy_factor``).
    """
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise ConversionError(f"{model_type}: rope parameters must be a mapping, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConversionError(
            f"{model_type}: rope type {rope_type!r} (scaled rotary such as llama3/yarn/dynamic/linear) is not "
            f"supported; supported rope types: ['default']"
        )
    unknown = sorted(set(params) - _ROPE_KEYS)
    if unknown:
        raise ConversionError(
            f"{model_type}: rope parameters {unknown} are not handled (per-layer-type or scaled rotary); "
            f"handled keys: {sorted(_ROPE_KEYS)}"
        )
    theta = params.get("rope_theta")
    if theta is None:
        theta = d.get(legacy_theta, default_theta)
    factor = params.get("partial_rotary_factor")
    if factor is None:
        factor = d.get(legacy_factor, default_factor)
    return float(theta), float(factor)


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
    """RMSNorm computed in float32 (param ``scale``), as Llama and Mamba use it."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
        return (y.astype(x.dtype) * scale.astype(x.dtype)).astype(x.dtype)


# ----------------------------------------------------------------------------- rotary


def rotary_tables(positions: jax.Array, rotary_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[T, rotary_dim]`` in the half-split ("rotate_half") convention."""
    inv_freq = 1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, rd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [T, rd]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first ``cos.shape[-1]`` features of ``x [B, T, H, Dh]``; the rest pass through."""
    rd = cos.shape[-1]
    xr, xpass = x[..., :rd], x[..., rd:]
    xf = xr.astype(jnp.float32)
    half = rd // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return jnp.concatenate([out.astype(x.dtype), xpass], axis=-1)


# ----------------------------------------------------------------------------- attention


def causal_attention(sites, prefix: str, q, k, v, *, scale: float, sliding_window: int | None = None):
    """Named attention core: emits ``{prefix}.q/.k/.v/.scores/.pattern/.z`` and returns z.

    q: [B, T, H, Dh]; k, v: [B, T, Hkv, Dh] with H % Hkv == 0 (grouped-query attention).
    Scores are scaled and causally masked (masked entries hold the dtype's minimum, so the
    pattern is exactly zero there); the softmax runs in float32.
    """
    q = sites(f"{prefix}.q", q)
    k = sites(f"{prefix}.k", k)
    v = sites(f"{prefix}.v", v)
    n_heads, n_kv = q.shape[2], k.shape[2]
    if n_heads != n_kv:
        rep = n_heads // n_kv
        k_full = jnp.repeat(k, rep, axis=2)
        v_full = jnp.repeat(v, rep, axis=2)
    else:
        k_full, v_full = k, v
    t_q, t_k = q.shape[1], k.shape[1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k_full) * jnp.asarray(scale, q.dtype)  # [B, H, Tq, Tk]
    qpos = jnp.arange(t_q)[:, None] + (t_k - t_q)
    kpos = jnp.arange(t_k)[None, :]
    allowed = kpos <= qpos
    if sliding_window is not None:
        allowed &= kpos > qpos - sliding_window
    scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    scores = sites(f"{prefix}.scores", scores)
    pattern = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    pattern = sites(f"{prefix}.pattern", pattern)
    z = jnp.einsum("bhqk,bkhd->bqhd", pattern, v_full)  # [B, T, H, Dh]
    return sites(f"{prefix}.z", z)


def attention_sites(prefix: str) -> list[str]:
    return [f"{prefix}.{n}" for n in ("q", "k", "v", "scores", "pattern", "z")]


def transformer_site_names(n_layers: int, parallel_residual: bool = False) -> tuple[str, ...]:
    """DESIGN.md's transformer sites in forward order (no ``resid_mid`` with a parallel residual)."""
    names = ["embed"]
    for i in range(n_layers):
        b = f"blocks.{i}"
        mid = [] if parallel_residual else [f"{b}.resid_mid"]
        names += [f"{b}.resid_pre", f"{b}.ln1", *attention_sites(f"{b}.attn"), f"{b}.attn_out", *mid,
                  f"{b}.ln2", f"{b}.mlp.pre", f"{b}.mlp.post", f"{b}.mlp_out", f"{b}.resid_post"]
    names.append("final_norm")
    return tuple(names)


def gather_positions(x: jax.Array, logits_at: jax.Array | None) -> jax.Array:
    """Select positions ``logits_at`` ([P] ints) of ``x [B, T, D]`` before the unembedding."""
    if logits_at is None:
        return x
    return jnp.take(x, logits_at, axis=1)


def unembed(x: jax.Array, embed: jax.Array, logits_at: jax.Array | None, *, tied: bool, vocab_size: int,
            kernel_init, name: str) -> jax.Array:
    """Logits ``[B, P, V]`` at ``logits_at`` (all positions if None) from the final-norm output.

    Call inside a compact module: untied models get their ``name`` Dense there (no bias).
    """
    x = gather_positions(x, logits_at).astype(embed.dtype)
    if tied:
        return jnp.einsum("btd,vd->btv", x, embed)
    return nn.Dense(vocab_size, use_bias=False, kernel_init=kernel_init, name=name)(x)


# ----------------------------------------------------------------------------- HF mapping


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: HF name <-> path in the Flax params tree.

    ``transform`` is ``"copy"`` (same layout) or ``"T"`` (torch Linear [out, in] <-> Dense
    kernel [in, out]), or a pair of callables (to_flax, to_hf) for anything else.
    """

    hf: str
    path: tuple[str, ...]
    transform: Any = "copy"

    def to_flax(self, a: np.ndarray) -> np.ndarray:
        if self.transform == "copy":
            return a
        if self.transform == "T":
            return np.swapaxes(a, 0, 1)
        return self.transform[0](a)

    def to_hf(self, a: np.ndarray) -> np.ndarray:
        if self.transform == "copy":
            return a
        if self.transform == "T":
            return np.swapaxes(a, 0, 1)
        return self.transform[1](a)


def _get(tree: Mapping, path: Sequence[str]):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: Sequence[str], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _hf_shape(entry: Entry, flax_shape: tuple) -> tuple:
    probe = np.empty(flax_shape, dtype=np.uint8)
    return tuple(entry.to_hf(probe).shape)


def params_from_hf(model_type: str, entries: Iterable[Entry], param_shapes: Any, tensors: Mapping[str, np.ndarray],
                   ignorable: Iterable[str] = (), rename: Callable[[str], str] | None = None) -> dict:
    """Build the Flax params tree from HF tensors, refusing missing, extra or mis-shaped ones.

    ``rename`` maps checkpoint names onto the port's canonical HF names (e.g. adds the
    ``transformer.`` prefix that old GPT-2 uploads lack). ``param_shapes`` is the params tree of ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``
    of the module's init), so expected HF shapes follow from the config alone.
    """
    entries = list(entries)
    renamed = {(rename(k) if rename else k): v for k, v in tensors.items()}
    expected = {e.hf: _hf_shape(e, tuple(_get(param_shapes, e.path).shape)) for e in entries}
    covered = {e.path for e in entries}
    all_paths = {tuple(str(getattr(k, "key", k)) for k in path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(param_shapes)[0]}
    if covered != all_paths:  # a port bug: a parameter with no checkpoint tensor
        raise AssertionError(f"{model_type}: params without HF mapping: {sorted(all_paths - covered)}")
    check_tensors(model_type, expected, renamed, ignorable)
    params: dict = {}
    for e in entries:
        _set(params, e.path, e.to_flax(renamed[e.hf]))
    return params


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


def params_to_hf(entries: Iterable[Entry], params: Any) -> dict[str, np.ndarray]:
    """Inverse of ``params_from_hf`` (used for export)."""
    return {e.hf: np.asarray(e.to_hf(np.asarray(_get(params, e.path)))) for e in entries}


def param_shapes(module: nn.Module, sites_factory: Callable[[], Any]) -> Any:
    """Shapes of a module's params without allocating them."""
    tokens = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens, sites_factory()))
    return shapes["params"]
