"""Hugging Face on-disk format: config.json + safetensors shards, read without torch.

The safetensors reader memory-maps each file and returns numpy arrays (bfloat16 via
``ml_dtypes``), so nothing is copied until a tensor is used and a sharded loader can
place slices on devices directly. It trusts nothing in a file: it opens regular files only
(a FIFO or a device never blocks it), bounds the header length, and checks every tensor's
dtype, shape and byte span (inside the file, the size its shape needs, no overlaps, no holes)
before mapping it. ``read_hf_dir`` checks that the index and the shards agree and reports
non-finite weights by name (``check_finite``).

Converters use ``check_config_fields``, ``check_config_types`` and ``check_tensors`` to refuse
what they do not understand, naming the offending fields or tensors: silent partial loads are
the worst bug in this field. Every error is one line (``jaxinterp.errors.cap_list``).

``write_hf_dir`` replaces its directory atomically: the export is built in a temporary sibling
directory and swapped into place, so a kill or a full disk mid-write leaves the previous
directory intact and no file of an earlier export survives.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import secrets
import shutil
import socket
import stat
import struct as _struct
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from jaxinterp.errors import cap_list, short_repr

__all__ = [
    "GENERIC_CONFIG_FIELDS",
    "HF_FIELD_TYPES",
    "INDEX_NAME",
    "ConversionError",
    "build_config",
    "check_config_fields",
    "check_config_types",
    "check_tensors",
    "check_finite",
    "read_model_type",
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
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_FLOAT_NAMES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_TENSOR_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
MAX_HEADER_BYTES = 100 * 2**20  # the reference implementation's limit
MAX_JSON_BYTES = 100 * 2**20  # config.json / index files
INDEX_NAME = "model.safetensors.index.json"

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


# ----------------------------------------------------------------------------- config checks


# The JSON type of every architecture field a port reads, by its Hugging Face name (the same name means
# the same thing across families). ``check_config_fields`` checks the handled fields found here.
_OPT_INT, _OPT_FLOAT = (int, None), (float, None)
HF_FIELD_TYPES: Mapping[str, Any] = {
    **dict.fromkeys((
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
        "n_positions", "n_ctx", "n_embd", "n_layer", "n_head", "state_size", "conv_kernel", "num_experts",
        "num_experts_per_tok", "num_local_experts", "original_max_position_embeddings", "num_heads", "n_groups",
        "chunk_size"), int),
    **dict.fromkeys((
        "num_key_value_heads", "head_dim", "intermediate_size", "n_inner", "rotary_dim", "sliding_window",
        "max_window_layers", "sliding_window_pattern", "_sliding_window_pattern"), _OPT_INT),
    **dict.fromkeys((
        "layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps", "rope_theta", "rotary_emb_base", "rotary_pct",
        "partial_rotary_factor", "rope_local_base_freq", "mixer_rms_eps"), float),
    **dict.fromkeys(("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "clip_qkv"),
                    _OPT_FLOAT),
    **dict.fromkeys((
        "tie_word_embeddings", "attention_bias", "mlp_bias", "use_parallel_residual", "scale_attn_weights",
        "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention", "use_bias",
        "use_conv_bias", "residual_in_fp32", "norm_topk_prob", "use_sliding_window"), bool),
    "use_bidirectional_attention": (bool, None),
    "activation_function": str, "hidden_act": str, "hidden_activation": (str, None),
    "rope_scaling": (dict, None), "rope_parameters": (dict, None), "layer_types": (list, None),
    "time_step_limit": (list, None), "expand": (int, float), "time_step_rank": (int, "auto"),
}


def check_config_fields(model_type: str, config: Mapping, handled: Iterable[str], ignored: Iterable[str] = (),
                        types: Mapping[str, Any] | None = None) -> None:
    """Refuse config.json fields that the port neither implements nor knows to be inert, and handled
    fields whose value has the wrong JSON type (``HF_FIELD_TYPES``, overridden or extended by ``types``;
    see ``check_config_types``)."""
    import difflib

    handled = set(handled)
    known = handled | set(ignored) | GENERIC_CONFIG_FIELDS
    unknown = sorted(str(k) for k in config if k not in known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(handled), n=3, cutoff=0.6)
        hint = f" (did you mean {cap_list(close)[1:-1]}?)" if close else ""
        raise ConversionError(
            f"{model_type} config has fields this converter does not handle: {cap_list(unknown)}{hint}. Refusing "
            f"rather than loading a model that may compute something different."
        )
    table = {**HF_FIELD_TYPES, **(types or {})}
    check_config_types(model_type, config, {f: t for f, t in table.items() if f in handled})


def read_model_type(family: str, config: Mapping, variants: Iterable[str], handled: Mapping[str, Iterable[str]] | Iterable[str],
                    ignored: Iterable[str] = (), *, default: str | None = None) -> str:
    """The checkpoint's ``model_type``, refused unless it is one of the family's ``variants``, with its
    config fields checked (``check_config_fields``) against ``handled`` (one list, or one per variant)."""
    variants = tuple(variants)
    variant = config.get("model_type", default)
    if variant not in variants:
        wanted = f"model type {variants[0]!r}" if len(variants) == 1 else f"model types {variants}"
        raise ConversionError(f"{family} family reads {wanted}, got {variant!r}")
    fields = handled[variant] if isinstance(handled, Mapping) else handled
    check_config_fields(variant, config, fields, ignored)
    return variant


def build_config(cls, model_type: str, **fields):
    """``cls(**fields)``, its validation errors raised as ``ConversionError`` naming the model type."""
    try:
        return cls(**fields)
    except ConversionError:
        raise
    except ValueError as err:
        raise ConversionError(f"{model_type}: {err}") from err


_TYPE_NAMES = {int: "int", float: "float", bool: "bool", str: "str", list: "list", dict: "object",
               type(None): "null"}


def _matches(value: Any, expected: Any) -> bool:
    if not isinstance(expected, type):  # a literal value, e.g. "auto"
        return type(value) is type(expected) and value == expected
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:  # JSON writes 10000.0 as 10000: an int is a valid float, a bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected)


def check_config_types(model_type: str, config: Mapping, types: Mapping[str, Any]) -> dict:
    """Refuse config.json values of the wrong JSON type; return the config with float fields as floats.

    ``types`` maps a field to ``int``, ``float``, ``bool``, ``str``, ``list``, ``dict``, ``None``
    (null), a literal value (e.g. ``"auto"``) or a tuple of them. ``int`` refuses bools and
    floats (``2.0``); ``float`` accepts ints. Fields absent from ``config`` are not checked.
    The error is one line naming the field, the expected type and the value found.
    """
    out = dict(config)
    for field, expected in types.items():
        if field not in config:
            continue
        options = expected if isinstance(expected, tuple) else (expected,)
        options = tuple(type(None) if o is None else o for o in options)
        value = config[field]
        if not any(_matches(value, o) for o in options):
            names = " or ".join(_TYPE_NAMES.get(o, o.__name__) if isinstance(o, type) else repr(o) for o in options)
            raise ConversionError(
                f"{model_type} config.json: field {field!r} must be {names}, got "
                f"{_TYPE_NAMES.get(type(value), type(value).__name__)} {short_repr(value, 60)}"
            )
        if float in options and type(value) is int and not any(_matches(value, o) for o in options if o is not float):
            out[field] = float(value)
    return out


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
        problems.append(f"missing tensors {cap_list(missing)}")
    if extra:
        problems.append(f"unexpected tensors {cap_list(extra)}")
    if wrong:
        problems.append(f"mis-shaped tensors {cap_list(wrong, limit=3, fmt=repr)}")
    if problems:
        raise ConversionError(f"{model_type} checkpoint does not match its config: " + "; ".join(problems))


def check_finite(tensors: Mapping[str, np.ndarray], strict: bool = False) -> list[str]:
    """Names of floating-point tensors holding NaN or inf; warn about them (``strict``: raise).

    Scans in chunks, so a memory-mapped checkpoint is read once and never copied whole.
    """
    from jaxinterp.placement import release

    bad = []
    for name, array in tensors.items():
        if _has_non_finite(array):
            bad.append(name)
        release(array)  # the scan's pages leave the resident set (load stays ~1.2x the file, not 2x)
    if bad:
        n = len(bad)
        message = f"non-finite values (NaN or inf) in {n} tensor{'s' if n != 1 else ''}: {cap_list(bad)}"
        if strict:
            raise ConversionError(message + "; refusing to load them (strict=True)")
        warnings.warn(message + "; the model computes NaN/inf wherever they are used (strict=True refuses them)",
                      RuntimeWarning, stacklevel=3)
    return bad


_CHUNK = 1 << 20  # elements per finiteness check


def _has_non_finite(array: np.ndarray) -> bool:
    dtype = np.dtype(array.dtype)
    if _NAMES.get(dtype) not in _FLOAT_NAMES:
        return False
    flat = np.asarray(array).reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start:start + _CHUNK]
        if dtype.kind != "f":  # ml_dtypes (bfloat16, float8): exact in float32
            chunk = chunk.astype(np.float32)
        if not np.isfinite(chunk).all():
            return True
    return False


# ----------------------------------------------------------------------------- safetensors


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


@contextlib.contextmanager
def _open_regular(path: Path, label: str) -> Iterator[tuple[Any, int]]:
    """Open ``path`` for reading only if it is a regular file: ``(file, size)``.

    Checked with ``stat`` before opening and ``fstat`` after (opened non-blocking, so a FIFO that
    replaced the file in between cannot block the open either).
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{label}: no such file ({path})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConversionError(f"{label}: not a regular file ({_file_kind(info.st_mode)}): {path}")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConversionError(f"{label}: not a regular file ({_file_kind(info.st_mode)}): {path}")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f, info.st_size


def _no_duplicate_keys(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ConversionError(f"the key {short_repr(key, 60)} appears twice (duplicate)")
        out[key] = value
    return out


def _parse_json(raw: bytes, label: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as err:
        raise ConversionError(f"{label} is not valid UTF-8 JSON (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ConversionError(f"{label} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise ConversionError(f"{label} is not valid JSON (nested too deeply)") from None
    except ConversionError as err:
        raise ConversionError(f"{label}: {err}") from None


def _read_header(f, size: int, label: str) -> tuple[dict, int]:
    """The parsed JSON header and its length, with the length bounded before anything is read."""
    if size < 8:
        raise ConversionError(f"{label}: file is {size} bytes, too short for the 8-byte header length (truncated?)")
    (n,) = _struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES:
        raise ConversionError(f"{label}: header length {n} exceeds the {MAX_HEADER_BYTES // 2**20} MB limit "
                              f"(corrupt or not a safetensors file)")
    if n > size - 8:
        raise ConversionError(f"{label}: header length {n} exceeds the {size - 8} bytes after it "
                              f"(truncated or not a safetensors file)")
    raw = f.read(n)
    if len(raw) != n:
        raise ConversionError(f"{label}: file ended inside the header (truncated)")
    header = _parse_json(raw, f"{label}: header")
    if not isinstance(header, dict):
        raise ConversionError(f"{label}: header must be a JSON object, got {type(header).__name__}")
    return header, n


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_entry(label: str, name: str, info: Any, data_size: int) -> tuple[np.dtype, list, int, int]:
    """Validate one header entry: (dtype, shape, begin, end) or a one-line ConversionError."""
    where = f"{label}: tensor {short_repr(name, 60)}"
    if not isinstance(info, dict):
        raise ConversionError(f"{where}: entry must be an object with dtype, shape and data_offsets, "
                              f"got {short_repr(info, 40)}")
    missing = sorted(_TENSOR_FIELDS - set(info))
    unknown = sorted(set(info) - _TENSOR_FIELDS)
    if missing or unknown:
        raise ConversionError(f"{where}: " + "; ".join(
            ([f"missing {cap_list(missing)}"] if missing else []) + ([f"unknown fields {cap_list(unknown)}"] if unknown else [])))
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ConversionError(f"{where}: unknown dtype {short_repr(dtype, 30)}; known dtypes: {sorted(_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ConversionError(f"{where}: shape {short_repr(shape, 60)} must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise ConversionError(f"{where}: data_offsets {short_repr(offsets, 60)} must be two non-negative integers "
                              f"[begin, end] with begin <= end")
    begin, end = offsets
    nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
    if nbytes != end - begin:
        raise ConversionError(f"{where}: shape {shape} of {dtype} needs {nbytes} bytes but data_offsets "
                              f"[{begin}, {end}] span {end - begin}")
    if end > data_size:
        raise ConversionError(f"{where}: data_offsets [{begin}, {end}] reach past the end of the data "
                              f"({data_size} bytes; file truncated?)")
    return _DTYPES[dtype], shape, begin, end


def _check_tiling(label: str, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """The tensors' byte spans tile the data section exactly: no overlap, no hole, nothing after."""
    pos, last = 0, None
    for begin, end, name in sorted(s for s in spans if s[1] > s[0]):
        if begin < pos:
            raise ConversionError(f"{label}: tensors {short_repr(last, 60)} and {short_repr(name, 60)} overlap "
                                  f"(bytes up to {pos} and from {begin})")
        if begin > pos:
            raise ConversionError(f"{label}: a gap of {begin - pos} bytes before tensor {short_repr(name, 60)} is not "
                                  f"covered by any tensor (corrupt header)")
        pos, last = end, name
    if pos != data_size:
        raise ConversionError(f"{label}: {data_size - pos} trailing bytes after the last tensor are not covered "
                              f"by any tensor (corrupt header or wrong file)")


def _check_metadata(label: str, metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ConversionError(f"{label}: __metadata__ must be an object of strings, got {short_repr(metadata, 60)}")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-map a .safetensors file as {name: numpy array} (read-only views), validating its header.

    Every fault is a one-line ``ConversionError`` naming the file, the tensor and the problem;
    a missing file is a ``FileNotFoundError``.
    """
    path = Path(path)
    label = path.name
    with _open_regular(path, label) as (f, size):
        header, n = _read_header(f, size, label)
    _check_metadata(label, header.pop("__metadata__", None))
    data_size = size - 8 - n
    entries = {name: _tensor_entry(label, name, info, data_size) for name, info in header.items()}
    _check_tiling(label, [(begin, end, name) for name, (_, _, begin, end) in entries.items()], data_size)
    data = (np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(data_size,)) if data_size
            else np.zeros(0, np.uint8))
    return {name: data[begin:end].view(dtype).reshape(shape) for name, (dtype, shape, begin, end) in entries.items()}


def _check_writable(tensors: Mapping[str, Any], metadata: Mapping | None) -> list[tuple[str, np.ndarray]]:
    out = []
    for name in tensors:
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ConversionError(f"tensor names must be non-empty strings other than '__metadata__', "
                                  f"got {short_repr(name, 60)}")
    for name in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[name]))
        if arr.dtype not in _NAMES:
            raise ConversionError(f"cannot write tensor {name!r} of dtype {arr.dtype}; safetensors dtypes: "
                                  f"{sorted(str(d) for d in _NAMES)}")
        out.append((name, arr))
    if metadata is not None and not (isinstance(metadata, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ConversionError(f"safetensors metadata must map strings to strings, got {short_repr(metadata, 60)}")
    return out


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write {name: array} as a .safetensors file (keys sorted, 8-byte aligned header).

    Atomic: written to a temporary file in the same directory and renamed over ``path``.
    """
    path = Path(path)
    arrays = _check_writable(tensors, metadata)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, arr in arrays:
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(_struct.pack("<Q", len(blob)))
            f.write(blob)
            for _, arr in arrays:
                f.write(arr.reshape(-1).view(np.uint8))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- directories


def _read_json_file(path: Path, label: str) -> Any:
    with _open_regular(path, label) as (f, size):
        if size > MAX_JSON_BYTES:
            raise ConversionError(f"{label}: {size} bytes exceeds the {MAX_JSON_BYTES // 2**20} MB limit for a JSON file")
        return _parse_json(f.read(), label)


def _read_index(path: Path) -> dict[str, str]:
    index = _read_json_file(path / INDEX_NAME, INDEX_NAME)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{INDEX_NAME}: expected a JSON object with a \"weight_map\" object mapping tensor "
                              f"names to files, got {short_repr(index, 60)}")
    for name, fname in weight_map.items():
        if not isinstance(fname, str):
            raise ConversionError(f"{INDEX_NAME}: weight_map[{short_repr(name, 60)}] must be a file name, "
                                  f"got {short_repr(fname, 40)}")
    outside = sorted({f for f in weight_map.values() if f != os.path.basename(f) or f in ("", ".", "..")})
    if outside:
        raise ConversionError(f"{INDEX_NAME} names files outside the model directory {cap_list(outside, fmt=repr)}; "
                              f"the index must name plain file names in the directory")
    return weight_map


def _weight_files(path: Path) -> tuple[list[str], dict[str, str] | None]:
    """The shard files to read and the index's weight map (None without an index)."""
    present = sorted(p.name for p in path.glob("*.safetensors"))
    if not os.path.lexists(path / INDEX_NAME):
        if len(present) > 1:
            raise ConversionError(f"{path} holds several safetensors files {cap_list(present)} but no {INDEX_NAME} "
                                  f"saying which tensors each holds; add the index or remove the stale files")
        return present, None
    weight_map = _read_index(path)
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.exists(path / f)]
    if missing:
        raise ConversionError(f"{INDEX_NAME} in {path} names files that do not exist: {cap_list(missing)}")
    stray = [f for f in present if f not in set(files)]
    if stray:
        raise ConversionError(f"{cap_list(stray)} in {path} are not named by the index {INDEX_NAME} (stale files "
                              f"of an earlier export?); remove them or fix the index")
    return files, weight_map


def _check_index(weight_map: Mapping[str, str], holder: Mapping[str, str]) -> None:
    """The index and the shards agree tensor by tensor."""
    absent = sorted(f"{n!r} in {f}" for n, f in weight_map.items() if n not in holder)
    unlisted = sorted(f"{n!r} in {f}" for n, f in holder.items() if n not in weight_map)
    moved = sorted(f"{n!r} in {holder[n]}, not {f}" for n, f in weight_map.items() if n in holder and holder[n] != f)
    problems = []
    if absent:
        problems.append(f"it lists tensors that no shard holds: {cap_list(absent, fmt=str)}")
    if unlisted:
        problems.append(f"it does not list tensors the shards hold: {cap_list(unlisted, fmt=str)}")
    if moved:
        problems.append(f"it puts tensors in the wrong shard: {cap_list(moved, fmt=str)}")
    if problems:
        raise ConversionError(f"{INDEX_NAME} disagrees with the shards: " + "; ".join(problems))


def read_hf_dir(path: str | os.PathLike, strict: bool = False, *, scan_values: bool = True
                ) -> tuple[dict, dict[str, np.ndarray]]:
    """Read config.json and every safetensors shard of a Hugging Face model directory.

    Refuses (one-line ``ConversionError``) an index that names missing files, safetensors files
    the index does not name (stale shards of an earlier export), an index and shards that
    disagree, several files without an index, and any malformed file. ``scan_values``: report
    tensors holding NaN/inf by name (a warning; ``strict=True`` makes it an error), which reads
    every weight once.
    """
    path = Path(path)
    config_path = path / "config.json"
    if not os.path.lexists(config_path):
        raise FileNotFoundError(f"{path} has no config.json; expected a Hugging Face model directory")
    config = _read_json_file(config_path, "config.json")
    if not isinstance(config, dict):
        raise ConversionError(f"config.json in {path} must hold a JSON object, got {type(config).__name__}")
    files, weight_map = _weight_files(path)
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        extra = f" (found {cap_list(bins)}: pickled weights are not loaded; convert them to safetensors)" if bins else ""
        raise FileNotFoundError(f"{path} has no *.safetensors weights{extra}")
    tensors: dict[str, np.ndarray] = {}
    holder: dict[str, str] = {}
    for name in files:
        shard = read_safetensors(path / name)
        dup = sorted(set(shard) & set(tensors))
        if dup:
            raise ConversionError(f"tensors {cap_list(dup)} appear in more than one shard of {path}")
        tensors.update(shard)
        holder.update(dict.fromkeys(shard, name))
    if weight_map is not None:
        _check_index(weight_map, holder)
    if scan_values:
        check_finite(tensors, strict)
    return config, tensors


# ----------------------------------------------------------------------------- atomic directory replacement

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> None:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); OSError(ENOSYS) elsewhere."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(b))


def _staging_name(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove_dead_staging(target: Path) -> None:
    """Remove partial/old directories left next to ``target`` by writers on this host that died."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(partial|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{8}}")
    for entry in target.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m is None or m["host"] != socket.gethostname():
            continue
        try:
            os.kill(int(m["pid"]), 0)
            continue  # its writer is alive
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            continue


def _replaceable_dir(path: str | os.PathLike) -> Path:
    """The absolute directory an export replaces; refuses a file or a directory holding other data."""
    target = Path(os.path.abspath(os.fspath(path)))
    if target.is_symlink():
        target = target.resolve()  # replace what the link points at; the link stays
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory; refusing to replace it with a model export")
    if not target.is_dir():
        return target
    entries = sorted(target.iterdir())
    subdirs = [e.name for e in entries if e.is_dir()]
    if subdirs:
        raise FileExistsError(f"{target} holds directories {cap_list(subdirs)}; an export replaces its whole "
                              f"directory, so it refuses one holding other data: export into a new directory")
    if entries and not (target / "config.json").is_file():
        raise FileExistsError(f"{target} holds {cap_list(e.name for e in entries)} but no config.json (not a model "
                              f"export); refusing to replace it: export into a new or empty directory")
    return target


def _fsync_tree(directory: Path) -> None:
    for entry in directory.iterdir():
        fd = os.open(entry, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem can sync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _swap_into_place(staged: Path, target: Path) -> Path | None:
    """Move ``staged`` to ``target``; return the directory that now holds the old contents (or None)."""
    if not os.path.lexists(target):
        os.rename(staged, target)
        return None
    try:
        _exchange(staged, target)  # one atomic step: readers see the old or the new directory, never neither
        return staged
    except OSError as err:
        if err.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    old = _staging_name(target, "old")  # fallback: two renames, with a short window without ``target``
    os.rename(target, old)
    try:
        os.rename(staged, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


@contextlib.contextmanager
def _staged_dir(target: Path) -> Iterator[Path]:
    """Yield an empty sibling of ``target``; on success swap it into place, on any failure delete it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(target)
    staged = _staging_name(target, "partial")
    os.mkdir(staged)  # same filesystem as target; mode from the umask
    try:
        yield staged
        _fsync_tree(staged)
        old = _swap_into_place(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_layout(path: Path, config: Mapping, tensors: Mapping[str, np.ndarray], max_shard_bytes: int | None) -> None:
    """config.json + model.safetensors, or shards + model.safetensors.index.json, into ``path``."""
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
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_hf_dir(path: str | os.PathLike, config: Mapping, tensors: Mapping[str, np.ndarray],
                 max_shard_bytes: int | None = None, *,
                 extra_files: Mapping[str, str | os.PathLike] | None = None) -> Path:
    """Write config.json + model.safetensors (or shards with an index) in Hugging Face's layout.

    Atomic, and replaces ``path`` as a whole: the directory is built in a temporary sibling
    (same filesystem), files synced, then swapped into place in one step (Linux
    ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames). A kill, a full disk or any error
    before the swap leaves the previous directory untouched; after it, nothing of the previous
    directory (stale shards, an old index, tokenizer files) remains. ``extra_files``
    ({file name: source path}) are copied in before the swap. Refuses to replace a file, or a
    directory that holds subdirectories or holds files but no config.json (not an export), rather
    than delete unrelated data. Partial directories of writers on this host that died are removed.
    Returns the absolute directory written (a symlink's target when ``path`` is a symlink).
    """
    target = _replaceable_dir(path)
    with _staged_dir(target) as staged:
        _write_layout(staged, config, tensors, max_shard_bytes)
        for name, source in (extra_files or {}).items():
            if name != os.path.basename(name) or name in ("", ".", ".."):
                raise ValueError(f"extra file name {name!r} must be a plain file name")
            shutil.copyfile(source, staged / name)
    return target
