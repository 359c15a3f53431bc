"""PEFT's on-disk LoRA layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor names are PEFT's for the Hugging Face architecture,
``base_model.model.<hf module>.lora_A.weight [r, d_in]`` and ``...lora_B.weight [d_out, r]``
(torch ``Linear`` layout, also for GPT-2's ``Conv1D`` modules, where PEFT sets
``fan_in_fan_out``). In our layout ``A [d_in, r]``, ``B [r, d_out]``, so both transpose.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxinterp.hf import ConversionError, read_safetensors, write_safetensors
from jaxinterp.lora.core import Lora, LoraConfig, LoraModel
from jaxinterp.lora.targets import projections
from jaxinterp.model import Model

__all__ = ["save_peft", "load_peft"]

_PREFIX = "base_model.model."


def save_peft(lm: LoraModel, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters in PEFT's layout (loadable with ``peft.PeftModel.from_pretrained``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = lm.lora.config
    projs = lm.lora.projections
    fan = {p.hf_fan_in_fan_out for p in projs}
    if len(fan) != 1:
        raise ConversionError("PEFT stores one fan_in_fan_out flag; these projections mix layouts")
    tensors = {}
    for p in projs:
        w = lm.lora.weights[p.name]
        tensors[f"{_PREFIX}{p.hf_module}.lora_A.weight"] = np.asarray(w["A"], np.float32).T.copy()
        tensors[f"{_PREFIX}{p.hf_module}.lora_B.weight"] = np.asarray(w["B"], np.float32).T.copy()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or getattr(lm.base, "source", None),
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(p.hf_module for p in projs),  # full names: exact, unambiguous matches
        "fan_in_fan_out": fan.pop(),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_safetensors(path / "adapter_model.safetensors", tensors)
    return path


def load_peft(model: Model, path: str | os.PathLike) -> LoraModel:
    """Read a PEFT LoRA directory written for ``model``'s architecture (plain LoRA only)."""
    path = Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ConversionError(f"{path}: peft_type {config.get('peft_type')!r} is not 'LORA'")
    for flag in ("use_rslora", "use_dora"):
        if config.get(flag):
            raise ConversionError(f"{path}: {flag}=True adapters are not supported (plain LoRA only)")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise ConversionError(f"{path}: adapters with trained biases or modules_to_save are not supported")
    tensors = read_safetensors(path / "adapter_model.safetensors")
    by_module = {p.hf_module: p for p in projections(model)}
    modules = sorted({k[len(_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
    unknown = [m for m in modules if m not in by_module]
    if unknown:
        raise ConversionError(f"{path}: adapters for modules this model has no projection for: {unknown}")
    projs = [p for p in projections(model) if p.hf_module in set(modules)]
    rank = int(config["r"])
    weights = {}
    for p in projs:
        a = tensors[f"{_PREFIX}{p.hf_module}.lora_A.weight"].T
        b = tensors[f"{_PREFIX}{p.hf_module}.lora_B.weight"].T
        if a.shape[1] != rank or b.shape[0] != rank:
            raise ConversionError(f"{path}: {p.hf_module} adapters have rank {a.shape[1]}, config says r={rank}")
        weights[p.name] = {"A": jnp.asarray(a, jnp.float32), "B": jnp.asarray(b, jnp.float32)}
    cfg = LoraConfig(rank=rank, alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout", 0.0)),
                     targets=tuple(p.name for p in projs))
    return LoraModel(model, Lora(weights, cfg, tuple(projs)))
