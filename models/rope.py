"""Reading rotary-embedding settings from Hugging Face configs (one place for every family)."""

from __future__ import annotations

from typing import Any, Mapping

from jaxinterp.hf import ConversionError

_ROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def read_rope(model_type: str, d: Mapping[str, Any], *, default_theta: float = 10000.0,
              default_factor: float = 1.0, legacy_theta: str = "rope_theta",
              legacy_factor: str = "partial_rotary_factor") -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from an HF config, refusing rope types not implemented.

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
