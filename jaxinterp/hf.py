"""Hugging Face on-disk format: config.json + safetensors shards, read without torch.

The safetensors reader memory-maps each file and returns numpy arrays (bfloat16 via
``ml_dtypes``), so nothing is copied until a tensor is used and a sharded loader can
place slices on devices directly. Converters use ``check_config_fields`` and
``check_tensors`` to refuse what they do not understand, naming the offending fields or
tensors: silent partial loads are the worst bug in this field.
"""

from __future__ import annotations

import json
import os
import struct as _struct
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

__all__ = [
    "GENERIC_CONFIG_FIELDS",
    "ConversionError",
    "check_config_fields",
    "check_tensors",
    "read_safetensors",
    "write_safetensors",
    "read_hf_dir",
    "write_hf_dir",
]

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}

# PretrainedConfig bookkeeping fields that never change the forward computation.
GENERIC_CONFIG_FIELDS = frozenset(
    """
    architectures transformers_version model_type torch_dtype dtype _name_or_path _commit_hash
    _attn_implementation_autoset _attn_implementation attn_implementation name_or_path
    bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id
    id2label label2id num_labels problem_type finetuning_task
    use_cache return_dict output_hidden_states output_attentions torchscript
    is_encoder_decoder is_decoder add_cross_attention cross_attention_hidden_size tie_encoder_decoder
    chunk_size_feed_forward pruned_heads tokenizer_class prefix task_specific_params
    initializer_range initializer_factor
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty
    temperature top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
    encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores
    return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
    """.split()
)


class ConversionError(ValueError):
    """A checkpoint or config that the converter does not understand."""


def check_config_fields(model_type: str, config: Mapping, handled: Iterable[str], ignored: Iterable[str] = ()) -> None:
    """Refuse config.json fields that the port neither implements nor knows to be inert."""
    known = set(handled) | set(ignored) | GENERIC_CONFIG_FIELDS
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        raise ConversionError(
            f"{model_type} config has fields this converter does not handle: {unknown}. "
            f"Handled fields: {sorted(set(handled))}. Refusing rather than loading a model that may compute "
            f"something different."
        )


def check_tensors(model_type: str, expected: Mapping[str, tuple], tensors: Mapping[str, np.ndarray],
                  ignorable: Iterable[str] = ()) -> None:
    """Exact key and shape check of a checkpoint against the port's expectation."""
    ignorable = tuple(ignorable)
    keys = set(tensors)
    missing = sorted(set(expected) - keys)
    extra = sorted(k for k in keys - set(expected) if not any(k.endswith(s) for s in ignorable))
    wrong = sorted(
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs expected {tuple(shape)}"
        for k, shape in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(shape)
    )
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"unexpected tensors {extra}")
    if wrong:
        problems.append(f"mis-shaped tensors {wrong}")
    if problems:
        raise ConversionError(f"{model_type} checkpoint does not match its config: " + "; ".join(problems))


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-map a .safetensors file as {name: numpy array} (read-only views)."""
    path = Path(path)
    with open(path, "rb") as f:
        (header_len,) = _struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    out = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ConversionError(f"{path.name}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(dtype).reshape(info["shape"])
    return out


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write {name: array} as a .safetensors file (keys sorted, 8-byte aligned header)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    arrays = []
    offset = 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[name]))
        if arr.dtype not in _NAMES:
            raise ConversionError(f"cannot write tensor {name!r} of dtype {arr.dtype}")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(_struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())


def read_hf_dir(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Read config.json and every safetensors shard of a Hugging Face model directory."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{path} has no config.json; expected a Hugging Face model directory")
    config = json.loads(config_path.read_text())
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        weight_map = None
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        extra = f" (found {bins}: pickled weights are not loaded; convert them to safetensors)" if bins else ""
        raise FileNotFoundError(f"{path} has no *.safetensors weights{extra}")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        shard = read_safetensors(path / name)
        dup = set(shard) & set(tensors)
        if dup:
            raise ConversionError(f"tensors {sorted(dup)} appear in more than one shard of {path}")
        tensors.update(shard)
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ConversionError(f"index lists tensors that no shard holds: {missing[:10]}")
    return config, tensors


def write_hf_dir(path: str | os.PathLike, config: Mapping, tensors: Mapping[str, np.ndarray],
                 max_shard_bytes: int | None = None) -> None:
    """Write config.json + model.safetensors (or shards with an index) in Hugging Face's layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    names = sorted(tensors)
    total = sum(np.asarray(tensors[n]).nbytes for n in names)
    if max_shard_bytes is None or total <= max_shard_bytes:
        write_safetensors(path / "model.safetensors", tensors)
        return
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nbytes = np.asarray(tensors[n]).nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path / fname, {n: tensors[n] for n in shard})
        weight_map.update({n: fname for n in shard})
    index = {"metadata": {"total_size": int(total)}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
