"""SAELens directories: ``cfg.json`` + ``sae_weights.safetensors`` (SAELens 6 and the older layouts).

Weights: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, ``b_enc [d_sae]``
(``b_gate`` for gated), plus ``threshold [d_sae]`` (jumprelu) or ``r_mag``, ``b_mag`` (gated),
and in old files ``scaling_factor [d_sae]`` (``finetuning_scaling_factor``: latents are
multiplied by it before decoding).

SAELens's forward, as read here (``sae_lens/saes/*.py``):

* input: ``normalize_activations`` ``none``; ``expected_average_only_in`` (inputs multiplied
  by a constant norm scaling factor ``s``, kept outside the SAE: ``activation_scaler.json``
  next to a training checkpoint, ``norm_scaling_factor`` in the config, or ``load(...,
  norm_scaling_factor=)``); ``constant_norm_rescale`` (each input scaled to norm
  ``sqrt(d_in)``); ``layer_norm`` (``(x - mean) / (std + 1e-5)``, undone by ``* std + mean``);
  then ``x - b_dec`` if ``apply_b_dec_to_input``.
* ``standard``: ``f = relu(pre)`` with ``pre = x' @ W_enc + b_enc``; ``topk``: the ``k``
  largest of ``pre``, ReLU'd (``rescale_acts_by_decoder_norm``: ``pre`` scaled by the decoder
  row norms before the top-k and ``f`` divided by them before decoding); ``jumprelu``:
  ``relu(pre) * (pre > threshold)``; ``gated``: ``(x' @ W_enc + b_gate > 0) * relu(x' @
  (W_enc * exp(r_mag)) + b_mag)``. Decoding: ``f @ W_dec + b_dec``, then the input
  normalisation undone. ``reshape_activations: hook_z`` flattens ``[..., heads, d_head]``.

Each maps onto a jaxinterp family (standard -> relu, topk, jumprelu, gated) with the same
latents: ``apply_b_dec_to_input=False`` moves ``b_dec @ W_enc`` into the encoder bias, the
scaling factors are folded into the weights, ``s`` becomes ``input_scale``, and the per-input
normalisations become the SAE's ``act_norm``. ``hook_name`` is mapped to a site by
``hooks.TL_HOOKS``.

Written back (``write_saelens``) in SAELens 6's layout with ``apply_b_dec_to_input: true``:
our ``input_scale`` folded into the weights, relu / panneal as ``standard``, batchtopk as
``jumprelu`` with its scalar inference threshold on every latent (as SAELens saves BatchTopK).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from jaxinterp.hf import read_safetensors, write_safetensors
from ..families import SAE, Reads, sae_from_params
from .common import FormatError, atomic_dir, centre_free_b_enc, check_tensors, jumprelu_log_threshold, reads_for
from .hooks import hook_for_site

__all__ = ["read_saelens", "write_saelens", "ARCHITECTURES", "NORMALIZE_ACTIVATIONS", "ACTIVATION_FNS"]

CFG, WEIGHTS, SCALER = "cfg.json", "sae_weights.safetensors", "activation_scaler.json"
NORMALIZE_ACTIVATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
ACTIVATION_FNS = {"standard": ("relu", "topk"), "topk": ("topk",), "jumprelu": ("relu",), "gated": ("relu",)}
_FAMILY = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
ARCHITECTURES = {"relu": "standard", "panneal": "standard", "topk": "topk", "batchtopk": "jumprelu",
                 "jumprelu": "jumprelu", "gated": "gated"}  # jaxinterp family -> SAELens architecture (on save)
_TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder")
_RENAMED = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}


# ----------------------------------------------------------------------------- config


def _flat_config(raw: dict) -> dict:
    """Top-level and ``metadata`` keys in one dict, pre-6 names renamed (top level wins)."""
    merged = {**(raw.get("metadata") or {}), **{k: v for k, v in raw.items() if k != "metadata"}}
    return {_RENAMED.get(k, k): v for k, v in merged.items()}


def _architecture(where: str, cfg: dict) -> tuple[str, int]:
    """``(architecture, k)`` after reconciling ``architecture`` with ``activation_fn``."""
    arch = cfg.get("architecture") or "standard"
    if arch in _TRANSCODERS:
        raise FormatError(f"{where}: architecture {arch!r} is a transcoder (reads one site, writes another), not an "
                          f"SAE; supported: {sorted(ACTIVATION_FNS)}")
    if arch not in ACTIVATION_FNS:
        raise FormatError(f"{where}: unsupported SAELens architecture {arch!r}; supported: {sorted(ACTIVATION_FNS)}")
    act = cfg.get("activation_fn") or ("topk" if arch == "topk" else "relu")
    if act not in ACTIVATION_FNS[arch]:
        raise FormatError(f"{where}: activation_fn {act!r} is not supported with architecture {arch!r}; valid: "
                          f"{list(ACTIVATION_FNS[arch])}")
    if act != "topk":
        return arch, 0
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if not isinstance(k, int) or k <= 0:
        raise FormatError(f"{where}: a topk SAE needs a positive integer k (cfg 'k' or activation_fn_kwargs.k), "
                          f"got {k!r}")
    return "topk", k


def _normalize_activations(where: str, cfg: dict) -> str:
    norm = cfg.get("normalize_activations", "none")
    if isinstance(norm, bool):  # SAELens < 3 wrote a flag
        norm = "expected_average_only_in" if norm else "none"
    norm = "none" if norm is None else norm
    if norm not in NORMALIZE_ACTIVATIONS:
        raise FormatError(f"{where}: normalize_activations={norm!r} is unknown; valid: {list(NORMALIZE_ACTIVATIONS)}")
    return norm


def _reads(where: str, cfg: dict) -> Reads:
    reshape = cfg.get("reshape_activations")
    if reshape not in (None, "none", "hook_z"):
        raise FormatError(f"{where}: reshape_activations={reshape!r} is unknown; valid: ['none', 'hook_z']")
    flatten = None if reshape is None else reshape == "hook_z"
    site = cfg.get("jaxinterp_site") or cfg.get("hook_name") or None
    try:
        return reads_for(site, cfg.get("hook_head_index"), flatten)
    except ValueError as err:
        raise FormatError(f"{where}: {err}") from None


def _norm_scaling_factor(path: Path, cfg: dict, given: float | None) -> float:
    if given is not None:
        return float(given)
    scaler = path / SCALER
    factor = json.loads(scaler.read_text()).get("scaling_factor") if scaler.exists() else None
    factor = cfg.get("norm_scaling_factor") if factor is None else factor
    if factor is None:
        raise FormatError(f"{path}: normalize_activations='expected_average_only_in' needs the norm scaling factor, "
                          f"and neither {SCALER} nor cfg norm_scaling_factor holds it; pass load(..., "
                          f"norm_scaling_factor=)")
    return float(factor)


# ----------------------------------------------------------------------------- weights


def _weights(where: str, t: dict, arch: str, d_in: int, d_sae: int, finetuning: bool) -> dict:
    """The tensors as float64, checked; the finetuning scaling factor folded into ``W_dec``."""
    want = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    want.update({"b_gate": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,)} if arch == "gated" else {"b_enc": (d_sae,)})
    if arch == "jumprelu":
        want["threshold"] = (d_sae,)
    check_tensors(where, t, want, {"scaling_factor": (d_sae,), "finetuning_scaling_factor": (d_sae,)})
    w = {name: np.asarray(v, np.float64) for name, v in t.items()}
    scale = w.pop("finetuning_scaling_factor", w.pop("scaling_factor", None))
    if scale is not None and not np.allclose(scale, 1.0):
        if not finetuning:
            raise FormatError(f"{where}: a scaling_factor tensor is present but cfg finetuning_scaling_factor is false")
        w["W_dec"] = scale[:, None] * w["W_dec"]
    return w


def _fold(w: dict, arch: str, apply_b_dec: bool, rescale_by_decoder_norm: bool) -> dict:
    """Parameters of the jaxinterp family (encoder centred by ``b_dec``, unit-free decoder)."""
    if arch == "gated":
        b_gate, b_mag = w["b_gate"], w["b_mag"]
        if not apply_b_dec:
            b_gate = centre_free_b_enc(b_gate, w["b_dec"], w["W_enc"])
            b_mag = centre_free_b_enc(b_mag, w["b_dec"], w["W_enc"] * np.exp(w["r_mag"]))
        return {"W_enc": w["W_enc"], "b_enc": b_gate, "W_dec": w["W_dec"], "b_dec": w["b_dec"], "r_mag": w["r_mag"],
                "b_mag": b_mag}
    b_enc = w["b_enc"] if apply_b_dec else centre_free_b_enc(w["b_enc"], w["b_dec"], w["W_enc"])
    params = {"W_enc": w["W_enc"], "b_enc": b_enc, "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    if rescale_by_decoder_norm:  # pre * n, f / n before decoding == unit-norm decoder rows, encoder scaled by n
        n = np.linalg.norm(w["W_dec"], axis=-1)
        params.update(W_enc=w["W_enc"] * n, b_enc=np.asarray(b_enc, np.float64) * n, W_dec=w["W_dec"] / n[:, None])
    if arch == "jumprelu":  # SAELens ReLUs first, so a threshold below 0 acts as 0
        params["log_threshold"] = jumprelu_log_threshold(np.maximum(w["threshold"], 0.0))
    return params


def read_saelens(path: str | os.PathLike, *, norm_scaling_factor: float | None = None) -> SAE:
    """Read a SAELens directory as a jaxinterp SAE (see the module docstring for the mapping)."""
    path = Path(path)
    path = path.parent if path.name in (CFG, WEIGHTS) else path
    where = str(path)
    cfg = _flat_config(json.loads((path / CFG).read_text()))
    arch, k = _architecture(where, cfg)
    norm = _normalize_activations(where, cfg)
    if "d_in" not in cfg or "d_sae" not in cfg:
        raise FormatError(f"{where}: cfg.json needs d_in and d_sae")
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    w = _weights(where, read_safetensors(path / WEIGHTS), arch, d_in, d_sae, bool(cfg.get("finetuning_scaling_factor")))
    params = _fold(w, arch, bool(cfg.get("apply_b_dec_to_input", True)),
                   arch == "topk" and bool(cfg.get("rescale_acts_by_decoder_norm", False)))
    scale = _norm_scaling_factor(path, cfg, norm_scaling_factor) if norm == "expected_average_only_in" else 1.0
    common = dict(input_scale=scale, reads=_reads(where, cfg),
                  act_norm=norm if norm in ("constant_norm_rescale", "layer_norm") else "none")
    family = _FAMILY[arch]
    if cfg.get("jaxinterp_family") == "panneal" and family == "relu":
        family = "panneal"  # same inference as relu; keeps a jaxinterp round trip's family
    thr = w.get("threshold")
    if cfg.get("jaxinterp_family") == "batchtopk" and family == "jumprelu" and np.all(thr == thr[0]):
        params.pop("log_threshold")
        return sae_from_params("batchtopk", params, k=int(cfg["jaxinterp_k"]), batch_threshold=float(thr[0]), **common)
    return sae_from_params(family, params, k=k, **common)


# ----------------------------------------------------------------------------- writing


def _tensors(sae: SAE) -> dict[str, np.ndarray]:
    """SAELens tensors of ``sae`` with ``input_scale`` folded in (``W_enc * s``, ``W_dec / s``, ``b_dec / s``)."""
    p = {k: np.asarray(v, np.float64) for k, v in sae.params.items()}
    s = float(sae.buffers["input_scale"])
    tensors = {"W_enc": p["W_enc"] * s, "W_dec": p["W_dec"] / s, "b_dec": p["b_dec"] / s}
    if sae.family == "gated":
        tensors.update(b_gate=p["b_enc"], r_mag=p["r_mag"], b_mag=p["b_mag"])
    else:
        tensors["b_enc"] = p["b_enc"]
    if sae.family == "jumprelu":
        tensors["threshold"] = np.exp(p["log_threshold"])
    if sae.family == "batchtopk":
        tensors["threshold"] = np.full(sae.d_sae, max(float(sae.buffers["threshold"]), 0.0))
    return {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}


def write_saelens(sae: SAE, path: str | os.PathLike, *, model_name: str = "", context_size: int | None = None) -> Path:
    """Write one SAE (not a stacked grid) as a SAELens 6 directory, atomically; returns ``path``."""
    if sae.params["W_dec"].ndim != 2:
        raise ValueError(f"write_saelens takes one SAE; got W_dec of shape {sae.params['W_dec'].shape} "
                         f"(unstack a grid first)")
    reads = sae.reads
    metadata = {"sae_lens_version": "6.0.0",  # the cfg layout written (SAELens picks its parser by it)
                "model_name": model_name, "hook_name": hook_for_site(reads.site) if reads.site else "",
                "hook_head_index": reads.head, "context_size": context_size, "jaxinterp_site": reads.site,
                "jaxinterp_family": sae.family}
    cfg = {"architecture": ARCHITECTURES[sae.family], "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": sae.act_norm,
           "reshape_activations": "hook_z" if reads.flatten_heads else "none", "metadata": metadata}
    if sae.family == "topk":
        cfg.update(k=int(sae.buffers["k"]), rescale_acts_by_decoder_norm=False)
    if sae.family == "batchtopk":
        metadata["jaxinterp_k"] = int(sae.buffers["k"])
    with atomic_dir(path) as tmp:
        write_safetensors(tmp / WEIGHTS, _tensors(sae))
        (tmp / CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    return Path(path)
