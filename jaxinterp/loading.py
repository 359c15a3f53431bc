"""``ji.load`` and ``ji.save_pretrained``: Hugging Face directories <-> ``Model``.

Sources, in the order they are tried:

1. an embedded default name (``"facts-gpt"``, ...; see ``embedded_models()``),
2. a local directory with ``config.json`` + ``*.safetensors`` (one file or shards with
   ``model.safetensors.index.json``),
3. a hub id (``"gpt2"``, ``"EleutherAI/pythia-70m"``), fetched with ``huggingface_hub``
   when the machine is online (only ``*.json``, ``*.safetensors`` and tokenizer files).

No torch is imported and no pickle is read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.families import family_for_config, family_for_model_type
from jaxinterp.hf import ConversionError, read_hf_dir, write_hf_dir
from jaxinterp.model import Model
from jaxinterp.placement import DevicePlacer
from jaxinterp.tokenizer import Tokenizer, check_vocab

__all__ = ["load", "save_pretrained", "read_model", "embedded_models", "embedded_dir", "resolve_source",
           "family_for_model_type", "ConversionError"]

_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16), "float16": np.dtype(np.float16)}


def _embedded_root() -> Path:
    # Installed (non-editable) layout: jaxinterp/models/embedded; repo layout: models/embedded.
    import jaxinterp.models as models_pkg

    return Path(models_pkg.__file__).resolve().parent / "embedded"


def embedded_models() -> list[str]:
    """Names of the small models shipped with the package."""
    root = _embedded_root()
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").exists())


def embedded_dir(name: str) -> Path:
    path = _embedded_root() / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no embedded model {name!r}; embedded models: {embedded_models()}")
    return path


def resolve_source(source: str | os.PathLike) -> Path:
    """The local directory ``load(source)`` reads: an embedded model's, a local one, or a hub download."""
    if isinstance(source, str) and source in embedded_models():
        return embedded_dir(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; ji.load expects a model directory (config.json + *.safetensors)")
    if isinstance(source, str) and source.count("/") <= 1 and not source.startswith((".", "/", "~")):
        return _download(source)
    raise FileNotFoundError(
        f"{source!r} is neither an embedded model ({embedded_models()}), a local directory, nor a hub id"
    )


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory or embedded model, and huggingface_hub is not installed "
            f"to fetch it from the hub (pip install 'jaxinterp[hf]')"
        ) from err
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt"]))
    except Exception as err:  # offline, unknown repo, gated repo ...
        raise FileNotFoundError(
            f"could not fetch {repo_id!r} from the hub ({type(err).__name__}: {err}); embedded models: "
            f"{embedded_models()}"
        ) from err


def load(source: str | os.PathLike, dtype: str = "float32", *, mesh=None, rules=None) -> Model:
    """Load a model from an embedded name, a local HF directory, or a hub id.

    With ``mesh`` (a ``jax.sharding.Mesh``) every parameter is placed sharded by ``rules``
    (a shipped rule-set name, a YAML path, or a ``jaxinterp.sharding.Rules``; default
    ``"fsdp_tp"``), each device receiving only its slices.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if rules is not None and mesh is None:
        raise ValueError("rules given without a mesh; pass mesh=jaxinterp.sharding.make_mesh(...) as well")
    path = resolve_source(source)
    if mesh is None:  # each tensor goes to the device as it is read
        fam, config, params, tokenizer = read_model(path, dtype, placer=DevicePlacer())
    else:
        from jaxinterp.sharding.place import place_host_params

        fam, config, host_params, tokenizer = read_model(path, dtype)
        params = place_host_params(host_params, fam.name, mesh, "fsdp_tp" if rules is None else rules, dtype)
    model = Model(params, config, fam.name, tokenizer)
    model.source = str(path)  # informative only (not part of the pytree)
    return model


def read_model(path: Path, dtype: str = "float32", placer=None):
    """``(family, config, params in dtype, tokenizer or None)`` of a local HF directory (host numpy arrays
    unless ``placer`` places them)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    hf_config, tensors = read_hf_dir(path)
    model_type = hf_config.get("model_type")
    if model_type is None:
        raise ConversionError(f"{path}/config.json has no model_type")
    fam = family_for_model_type(model_type)
    config = fam.config_cls.from_hf(hf_config)
    host_params = fam.from_hf(config, tensors, _DTYPES[dtype], placer=placer)
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer is not None:
        check_vocab(tokenizer, config.vocab_size, str(path))
    return fam, config, host_params, tokenizer


def save_pretrained(model: Model, path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                    dtype: str = "float32", max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` as a Hugging Face directory readable by ``ji.load`` and ``transformers``.

    The model's tokenizer (if any) is written alongside; ``tokenizer_dir``: a directory whose
    tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json) are copied
    instead.
    """
    fam = family_for_config(model.config)
    np_dtype = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}[dtype]
    tensors = {k: np.asarray(jnp.asarray(v).astype(np_dtype)) for k, v in fam.to_hf(model.config, model.params).items()}
    hf_config = dict(model.config.to_hf())
    hf_config["torch_dtype"] = dtype
    path = Path(path)
    write_hf_dir(path, hf_config, tensors, max_shard_bytes=max_shard_bytes)
    if tokenizer_dir is None and model.tokenizer is not None:
        model.tokenizer.save(path)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            src = Path(tokenizer_dir) / name
            if src.exists() and src.resolve() != (path / name).resolve():
                shutil.copy(src, path / name)
    return path
