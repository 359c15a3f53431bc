"""Rotary-embedding settings of Hugging Face configs (one place for every family).

``read_rope`` (theta and partial factor, default rotary only) serves families that never scale
their rotary embedding. ``read_scaling`` reads the full ``rope_parameters`` / legacy
``rope_scaling`` dict into a ``RopeScaling`` (hashable, kept on a family's config) and
``make_rope`` turns theta + scaling into the ``models.common.Rope`` the shared block applies,
computing the inverse frequencies exactly as transformers' ``modeling_rope_utils`` does:

* ``linear``: ``inv_freq / factor``;
* ``dynamic`` (NTK): theta rescaled from the call's sequence length once it exceeds the trained
  context (``Rope.ntk_*``, evaluated per call);
* ``yarn``: per-frequency blend of interpolation and extrapolation with a linear ramp between the
  ``beta_fast`` / ``beta_slow`` correction dims, and cos/sin scaled by ``attention_factor``;
* ``llama3``: low frequencies divided by ``factor``, high ones kept, a smooth blend between;
* ``longrope``: ``short_factor`` or ``long_factor`` per frequency, chosen per call by length,
  cos/sin scaled by ``attention_factor``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import numpy as np

from jaxinterp.hf import ConversionError
from jaxinterp.models.common import Rope, default_inv_freq

_ROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}

# rope type -> (required keys, optional keys) besides rope_type / rope_theta / partial_rotary_factor
ROPE_TYPES: dict[str, tuple[frozenset, frozenset]] = {
    "default": (frozenset(), frozenset()),
    "linear": (frozenset({"factor"}), frozenset()),
    "dynamic": (frozenset({"factor"}), frozenset()),
    "yarn": (frozenset({"factor", "original_max_position_embeddings"}),
             frozenset({"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"})),
    "llama3": (frozenset({"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}),
               frozenset()),
    "longrope": (frozenset({"short_factor", "long_factor", "original_max_position_embeddings"}),
                 frozenset({"attention_factor", "factor"})),
}


def read_rope(model_type: str, d: Mapping[str, Any], *, default_theta: float = 10000.0,
              default_factor: float = 1.0, legacy_theta: str = "rope_theta",
              legacy_factor: str = "partial_rotary_factor") -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from an HF config, refusing scaled rope types.

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


# ----------------------------------------------------------------------------- scaled rotary


def _hashable(v):
    return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """A scaled rotary type and its own parameters (the HF dict's keys other than theta/partial).

    ``params``: sorted ``(key, value)`` pairs (lists as tuples) so the spec is hashable;
    ``trained_len``: ``dynamic`` only, the context the model was trained for (HF
    ``max_position_embeddings``); past it theta is rescaled per call.
    """

    rope_type: str
    params: tuple[tuple[str, Any], ...] = ()
    trained_len: Optional[int] = None

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES or self.rope_type == "default":
            raise ValueError(f"RopeScaling.rope_type must be one of {sorted(set(ROPE_TYPES) - {'default'})}, "
                             f"got {self.rope_type!r}")
        required, optional = ROPE_TYPES[self.rope_type]
        keys = {k for k, _ in self.params}
        if keys - required - optional or required - keys:
            raise ValueError(f"{self.rope_type} rope needs {sorted(required)} (optional {sorted(optional)}), "
                             f"got {sorted(keys)}")
        if self.rope_type == "dynamic" and not self.trained_len:
            raise ValueError("dynamic rope needs trained_len (HF max_position_embeddings)")
        factor = self.get("factor")
        if factor is not None and factor < 1.0:
            raise ValueError(f"{self.rope_type} rope factor must be >= 1, got {factor}")

    @classmethod
    def of(cls, rope_type: str, trained_len: Optional[int] = None, **params) -> "RopeScaling":
        return cls(rope_type=rope_type, params=tuple(sorted((k, _hashable(v)) for k, v in params.items()
                                                            if v is not None)), trained_len=trained_len)

    def get(self, key: str, default=None):
        return dict(self.params).get(key, default)

    def to_hf(self) -> dict[str, Any]:
        return {"rope_type": self.rope_type, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params}}


def read_scaling(model_type: str, params: Mapping[str, Any], *, max_position_embeddings: int
                 ) -> tuple[float | None, float | None, Optional[RopeScaling]]:
    """``(rope_theta or None, partial_rotary_factor or None, scaling or None)`` of one rope dict.

    Refuses an unknown rope type and any key the type does not use, naming the valid ones.
    """
    if not isinstance(params, Mapping):
        raise ConversionError(f"{model_type}: rope parameters must be a mapping, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConversionError(f"{model_type}: unsupported rope type {rope_type!r} (rope_parameters.rope_type); "
                              f"supported rope types: {sorted(ROPE_TYPES)}")
    required, optional = ROPE_TYPES[rope_type]
    own = {k: v for k, v in params.items() if k not in _ROPE_KEYS}
    unknown = sorted(set(own) - required - optional)
    missing = sorted(required - {k for k, v in own.items() if v is not None})
    if unknown or missing:
        what = [f"unknown keys {unknown}"] * bool(unknown) + [f"missing keys {missing}"] * bool(missing)
        raise ConversionError(f"{model_type}: rope type {rope_type!r} has {' and '.join(what)}; it takes "
                              f"{sorted(required)} (optional {sorted(optional)})")
    theta = params.get("rope_theta")
    partial = params.get("partial_rotary_factor")
    if rope_type == "default":
        return theta, partial, None
    trained = max_position_embeddings if rope_type == "dynamic" else None
    try:
        return theta, partial, RopeScaling.of(rope_type, trained, **own)
    except ValueError as err:
        raise ConversionError(f"{model_type}: {err}") from err


def read_rope_dict(model_type: str, d: Mapping[str, Any], *, max_position_embeddings: int,
                   default_theta: float = 10000.0) -> tuple[float, float, Optional[RopeScaling]]:
    """``(theta, partial_rotary_factor, scaling)`` of a config with one rope for every layer.

    Reads ``rope_parameters`` (transformers 5) or the legacy ``rope_scaling`` + top-level
    ``rope_theta`` / ``partial_rotary_factor``.
    """
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta, partial, scaling = read_scaling(model_type, params, max_position_embeddings=max_position_embeddings)
    theta = d.get("rope_theta", default_theta) if theta is None else theta
    partial = d.get("partial_rotary_factor", 1.0) if partial is None else partial
    if not 0.0 < float(partial) <= 1.0:
        raise ConversionError(f"{model_type}: partial_rotary_factor must be in (0, 1], got {partial}")
    return float(theta), float(partial), scaling


def rope_to_hf(theta: float, scaling: Optional[RopeScaling], partial: float = 1.0) -> dict[str, Any]:
    """The ``rope_parameters`` dict transformers 5 reads back to the same rotary."""
    out = {"rope_type": "default"} if scaling is None else scaling.to_hf()
    out["rope_theta"] = theta
    if partial != 1.0:
        out["partial_rotary_factor"] = partial
    return out


def read_full_rope(model_type: str, d: Mapping[str, Any], *, max_position_embeddings: int
                   ) -> tuple[float, Optional[RopeScaling]]:
    """``read_rope_dict`` for families that rotate every feature of a head: (theta, scaling), refusing a
    ``partial_rotary_factor`` other than 1."""
    theta, partial, scaling = read_rope_dict(model_type, d, max_position_embeddings=max_position_embeddings)
    if partial != 1.0:
        raise ConversionError(f"{model_type}: partial_rotary_factor={partial} is not supported (only 1.0)")
    return theta, scaling


def usable_context(max_position_embeddings: int, scaling: Optional[RopeScaling]) -> int:
    """The longest sequence a config accepts: the HF context, or ``factor`` times it for dynamic NTK
    (whose whole point is running past the trained context)."""
    if scaling is not None and scaling.rope_type == "dynamic":
        return int(max_position_embeddings * scaling.get("factor"))
    return max_position_embeddings


def hf_context(max_seq_len: int, scaling: Optional[RopeScaling]) -> int:
    """Inverse of ``usable_context``: the ``max_position_embeddings`` to write."""
    return scaling.trained_len if scaling is not None and scaling.rope_type == "dynamic" else max_seq_len


# ----------------------------------------------------------------------------- frequencies


def make_rope(head_dim: int, theta: float, scaling: Optional[RopeScaling] = None, *, partial: float = 1.0,
              max_position_embeddings: Optional[int] = None, interleaved: bool = False) -> Rope:
    """The ``Rope`` of ``theta`` + ``scaling`` over ``int(head_dim * partial)`` rotary features."""
    dim = int(head_dim * partial)
    base = default_inv_freq(dim, theta)
    kind = "default" if scaling is None else scaling.rope_type
    factor = None if scaling is None else scaling.get("factor")
    kw: dict[str, Any] = {"interleaved": interleaved}
    if kind == "linear":
        inv = base / np.float32(factor)
    elif kind == "dynamic":
        inv = base
        kw.update(switch_len=scaling.trained_len, ntk_theta=float(theta), ntk_factor=float(factor))
    elif kind == "yarn":
        inv, kw["attention_factor"] = _yarn(dim, theta, scaling, max_position_embeddings)
    elif kind == "llama3":
        inv = _llama3(base, scaling)
    elif kind == "longrope":
        orig = int(scaling.get("original_max_position_embeddings"))
        shape = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        powers = (np.float32(theta) ** shape).astype(np.float32)
        short, long = (np.asarray(scaling.get(k), np.float32) for k in ("short_factor", "long_factor"))
        if len(short) != len(base) or len(long) != len(base):
            raise ConversionError(f"longrope short_factor / long_factor need {len(base)} entries (rotary dim {dim} / 2), "
                                  f"got {len(short)} / {len(long)}")
        inv = (1.0 / (short * powers)).astype(np.float32)
        kw.update(long_inv_freq=tuple((1.0 / (long * powers)).astype(np.float32).tolist()), switch_len=orig,
                  attention_factor=_longrope_attention(scaling, max_position_embeddings))
    else:
        inv = base
    return Rope(inv_freq=tuple(np.asarray(inv, np.float32).tolist()), **kw)


def _yarn(dim: int, theta: float, scaling: RopeScaling, max_position_embeddings) -> tuple[np.ndarray, float]:
    """YaRN inverse frequencies and cos/sin scale (transformers' ``_compute_yarn_parameters``)."""
    orig = scaling.get("original_max_position_embeddings")
    factor = scaling.get("factor")
    attention = scaling.get("attention_factor")
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention is None:
        if mscale and mscale_all:
            attention = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all))
        else:
            attention = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    pos_freqs = (np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))).astype(np.float32)
    inv_extra = (1.0 / pos_freqs).astype(np.float32)
    inv_inter = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    return (inv_inter * (1 - extrapolation) + inv_extra * extrapolation).astype(np.float32), float(attention)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _llama3(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    """Llama 3.1's frequency-dependent scaling (transformers' ``_compute_llama3_parameters``)."""
    factor, low_ff, high_ff = (scaling.get(k) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    old = scaling.get("original_max_position_embeddings")
    low_wavelen, high_wavelen = old / low_ff, old / high_ff
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
    smooth = ((old / wavelen - low_ff) / (high_ff - low_ff)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _longrope_attention(scaling: RopeScaling, max_position_embeddings) -> float:
    orig = scaling.get("original_max_position_embeddings")
    attention = scaling.get("attention_factor")
    if attention is not None:
        return float(attention)
    factor = scaling.get("factor")
    if factor is None:
        if max_position_embeddings is None:
            raise ConversionError("longrope without factor needs max_position_embeddings")
        factor = max_position_embeddings / orig
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
