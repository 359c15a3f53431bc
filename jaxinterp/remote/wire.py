"""The wire format: interventions, arrays and plain values as data, never pickle.

One blob is a safetensors file: the arrays are its tensors and the structure is JSON kept in the
header's ``__metadata__["structure"]`` (``"format": "jaxinterp.wire"``, ``"version": "1"``). The
same bytes are a request body, a response body and a file on disk (``save_intervention``).

Structure nodes::

    null, true, 3, 0.5, "text"                 plain JSON values (kept as they are)
    {"list": [node, ...]}, {"tuple": [...]}    sequences
    {"dict": {"key": node, ...}}               mappings with string keys
    {"array": "t0"}                            tensor t0 of the blob
    {"iv": "Patch", "fields": {...}}           a built-in intervention (its dataclass fields)
    {"iv": "Fn", "module": "t3"}               a ji.Fn whose function is a jax.export module (uint8 tensor)
    {"exported": "t4"}                         a bare jax.export module (a sweep metric), ``ExportedFn``
    {"sae": "topk", "fields": {...}}           an SAE (for ``jaxinterp.sae.Splice``); ``"reads"`` a dict

Decoding trusts nothing: tensor dtypes come from a closed list, offsets must tile the data
exactly, the header and the nesting depth are bounded, only the listed kinds and their own field
names are accepted, and an exported module is refused when it has custom calls (beyond shape
assertions), loops, effects, or tensors larger than a bound. Every refusal is a ``WireError``
(a ``ValueError``) naming the problem.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct as _struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp import interventions as _iv
from jaxinterp.hf import _DTYPES, _NAMES

__all__ = ["WireError", "Limits", "encode", "decode", "save_intervention", "load_intervention", "export_fn",
           "export_metric", "ExportedMetric", "ExportedFn", "check_module", "check_safe"]

FORMAT, VERSION = "jaxinterp.wire", "1"
_KINDS = {cls.__name__: cls for cls in (_iv.Patch, _iv.ZeroAblate, _iv.MeanAblate, _iv.Add, _iv.Scale,
                                          _iv.ProjectOut, _iv.Noise, _iv.Steer, _iv.Compose, _iv.ByLayer)}
_SAFE_CUSTOM_CALLS = frozenset({"shape_assertion", "Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"})


class WireError(ValueError):
    """A blob that is malformed, too large, or asks for something the format does not allow."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Limits:
    """Bounds a decoder enforces (the server's request limits)."""

    max_bytes: int = 1 << 30  # the whole blob
    max_header_bytes: int = 8 << 20  # the safetensors JSON header
    max_depth: int = 32  # nesting of structure nodes
    max_nodes: int = 100_000
    max_module_bytes: int = 1 << 20  # one serialized jax.export module
    max_module_elements: int = 1 << 28  # the largest static tensor inside a module

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if not isinstance(getattr(self, f.name), int) or getattr(self, f.name) <= 0:
                raise ValueError(f"Limits.{f.name} must be a positive int, got {getattr(self, f.name)!r}")


# ----------------------------------------------------------------------------- exported functions


class ExportedFn:
    """A ``jax.export`` module used as ``ji.Fn``'s function: it can travel as data.

    Equal modules (same serialized bytes) compare equal, so decoding the same module twice reuses
    one compiled program.
    """

    def __init__(self, exported: "jax.export.Exported", blob: bytes):
        self.exported, self.blob = exported, bytes(blob)

    def __call__(self, *args):
        return self.exported.call(*args)

    def __eq__(self, other):
        return isinstance(other, ExportedFn) and other.blob == self.blob

    def __hash__(self):
        return hash(self.blob)

    def __repr__(self):
        return f"ExportedFn({self.exported.fun_name}, in={self.exported.in_avals}, {len(self.blob)} bytes)"


def export_fn(fn: Callable[[jax.Array], jax.Array], shape: Sequence[int | str], dtype="float32", *,
              platforms: Optional[Sequence[str]] = None) -> _iv.Fn:
    """``ji.Fn(fn)`` whose function is exported with ``jax.export`` for inputs ``shape``/``dtype``.

    ``shape`` may name symbolic dimensions (``("b", "t", 64)``) so one module serves any batch and
    length. ``platforms`` defaults to cpu, cuda and tpu, so a server on any of them can run it.
    """
    dims = ", ".join(str(d) for d in shape)
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"({dims},)" if len(shape) == 1 else dims)
                                if any(isinstance(d, str) for d in shape) else tuple(shape), jnp.dtype(dtype))
    exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms or ("cpu", "cuda", "tpu")))(spec)
    return _iv.Fn(ExportedFn(exported, exported.serialize()))


def _backend_platforms() -> tuple[str, ...]:
    """The jax.export platform names that can run on this process's default backend."""
    backend = jax.default_backend()
    return ("cuda", "rocm") if backend == "gpu" else (backend,)


def check_module(exported: "jax.export.Exported", limits: Limits = Limits()) -> None:
    """Refuse a ``ji.Fn`` module that is not ``x -> x`` of one shape, could run host code or costs more
    than ``limits`` allow."""
    if len(exported.in_avals) != 1 or len(exported.out_avals) != 1:
        raise WireError(f"an exported Fn must take one array and return one, got {len(exported.in_avals)} inputs and "
                        f"{len(exported.out_avals)} outputs")
    (a,), (b,) = exported.in_avals, exported.out_avals
    if a.shape != b.shape or a.dtype != b.dtype:
        raise WireError(f"an exported Fn must return its input's shape and dtype: {a.str_short()} -> {b.str_short()}")
    check_safe(exported, limits)


def check_safe(exported: "jax.export.Exported", limits: Limits = Limits()) -> None:
    """Refuse any exported function (a Fn's, a sweep metric's) that could run host code or costs more than
    ``limits`` allow."""
    if exported.ordered_effects or exported.unordered_effects:
        raise WireError("the exported Fn has side effects; only pure functions are accepted")
    if exported.nr_devices != 1:
        raise WireError(f"the exported Fn was exported for {exported.nr_devices} devices; export it for one")
    if not set(_backend_platforms()) & set(exported.platforms):
        raise WireError(f"the exported Fn was lowered for {list(exported.platforms)}, not for this server's "
                        f"{jax.default_backend()!r}; export it with platforms=('cpu', 'cuda', 'tpu')")
    text = exported.mlir_module()
    targets = set(re.findall(r"custom_call\s*@([\w.$-]+)", text)) | set(
        re.findall(r'call_target_name\s*=\s*"([^"]*)"', text))
    unsafe = sorted(targets - _SAFE_CUSTOM_CALLS)
    if unsafe or re.search(r"\bcustom_call\b", text) and not targets:
        raise WireError(f"the exported Fn contains custom calls {unsafe or ['?']} (host callbacks or native "
                        f"kernels); only plain StableHLO is accepted")
    if re.search(r"stablehlo\.(while|infeed|outfeed|send|recv|rng_bit_generator)\b", text):
        raise WireError("the exported Fn contains loops or host communication (while/infeed/outfeed/send/recv); "
                        "only straight-line StableHLO is accepted")
    for dims in re.findall(r"tensor<((?:[0-9?]+x)+)[a-z]", text):
        size = int(np.prod([int(d) for d in dims.rstrip("x").split("x") if d != "?"], dtype=np.float64))
        if size > limits.max_module_elements:
            raise WireError(f"the exported Fn holds a tensor of {size} elements, more than the limit "
                            f"{limits.max_module_elements}")


def _load_module(blob: np.ndarray, limits: Limits, fn: bool = True) -> _iv.Fn | ExportedFn:
    """A ``ji.Fn`` (``fn``: checked to be ``x -> x``) or a bare ``ExportedFn`` from a uint8 tensor."""
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise WireError(f"an exported module must be a 1-D uint8 tensor, got {blob.dtype}{list(blob.shape)}")
    if blob.size > limits.max_module_bytes:
        raise WireError(f"an exported module of {blob.size} bytes exceeds the limit of {limits.max_module_bytes}")
    try:
        exported = jax.export.deserialize(bytearray(blob.tobytes()))
    except Exception as e:  # flatbuffers / MLIR parse errors of every kind
        raise WireError(f"an exported module is not a jax.export serialization ({type(e).__name__})") from None
    (check_module if fn else check_safe)(exported, limits)
    out = ExportedFn(exported, blob.tobytes())
    return _iv.Fn(out) if fn else out


def export_metric(fn: Callable[..., jax.Array], logits, *args, platforms: Optional[Sequence[str]] = None) -> ExportedFn:
    """A sweep metric ``fn(logits [B, V], *args) -> scalar`` that can travel as data.

    The module exported (``jax.export``, for the shapes and dtypes of ``logits`` and ``args``, arrays or
    ``ShapeDtypeStruct``s) is ``fn`` vmapped over a leading symbolic axis of ``logits`` (``[n, B, V] ->
    [n]``): a sweep evaluates its cells in vmapped chunks, and an exported module cannot be vmapped
    itself. ``ExportedMetric`` runs it as ``fn`` again.
    """
    def spec(a):
        return a if isinstance(a, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a))

    out = jax.eval_shape(fn, spec(logits), *map(spec, args))
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        raise ValueError(f"a metric must return one scalar, got {out}")
    logits = spec(logits)
    dims = ", ".join(["n", *map(str, logits.shape)])
    batched = jax.ShapeDtypeStruct(jax.export.symbolic_shape(dims), logits.dtype)
    exported = jax.export.export(jax.jit(jax.vmap(fn, in_axes=(0, *[None] * len(args)))),
                                 platforms=tuple(platforms or ("cpu", "cuda", "tpu")))(batched, *map(spec, args))
    return ExportedFn(exported, exported.serialize())


class ExportedMetric:
    """``fn(logits, *args) -> scalar`` from ``export_metric``'s module (``[n, B, V] -> [n]``), vmappable
    over ``logits`` (``jax.custom_batching``). Equal modules compare equal (one compiled sweep)."""

    def __init__(self, module: ExportedFn):
        exported = module.exported
        (out,) = exported.out_avals if len(exported.out_avals) == 1 else (None,)
        if out is None or len(out.shape) != 1 or not exported.in_avals or len(exported.in_avals[0].shape) < 1 \
                or out.shape[0] != exported.in_avals[0].shape[0]:
            raise WireError("a sweep metric must be exported by ji.remote.export_metric: [n, B, V], *args -> [n]")
        self.module = module

        @jax.custom_batching.custom_vmap
        def call(logits, *args):
            return module.exported.call(logits[None], *args)[0]

        @call.def_vmap
        def _rule(axis_size, in_batched, logits, *args):
            if any(in_batched[1:]):
                raise ValueError("a remote sweep metric's extra arguments cannot be vmapped")
            if not in_batched[0]:
                logits = jnp.broadcast_to(logits, (axis_size, *logits.shape))
            return module.exported.call(logits, *args), True

        self._call = call

    def __call__(self, logits, *args):
        return self._call(logits, *args)

    def __eq__(self, other):
        return isinstance(other, ExportedMetric) and other.module == self.module

    def __hash__(self):
        return hash(self.module)


# ----------------------------------------------------------------------------- encoding


class _Writer:
    def __init__(self):
        self.tensors: dict[str, np.ndarray] = {}

    def array(self, a) -> dict:
        arr = np.asarray(a)
        if arr.dtype not in _NAMES:
            raise WireError(f"cannot encode an array of dtype {arr.dtype} (dtypes: {sorted(map(str, _NAMES))})")
        name = f"t{len(self.tensors)}"
        self.tensors[name] = arr
        return {"array": name}

    def node(self, obj) -> Any:
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
            return self.array(obj)
        if isinstance(obj, ExportedFn):
            return {"exported": self.array(np.frombuffer(obj.blob, np.uint8))["array"]}
        if isinstance(obj, _iv.Fn):
            if not isinstance(obj.fn, ExportedFn):
                raise WireError("ji.Fn wraps a Python callable, which cannot travel as data; export it first: "
                                "ji.remote.export_fn(fn, shape, dtype)")
            return {"iv": "Fn", "module": self.array(np.frombuffer(obj.fn.blob, np.uint8))["array"]}
        if type(obj).__name__ in _KINDS and isinstance(obj, _KINDS[type(obj).__name__]):
            return {"iv": type(obj).__name__, "fields": self.fields(obj)}
        kind = _sae_kind(obj)
        if kind == "Splice":
            return {"iv": "Splice", "fields": self.fields(obj)}
        if kind == "SAE":
            return {"sae": obj.family, "fields": self.fields(obj)}
        if kind == "Reads":
            return {"reads": dataclasses.asdict(obj)}
        if isinstance(obj, (list, tuple)):
            return {"list" if isinstance(obj, list) else "tuple": [self.node(x) for x in obj]}
        if isinstance(obj, dict) or _is_mapping(obj):
            if not all(isinstance(k, str) for k in obj):
                raise WireError("only mappings with string keys can be encoded")
            return {"dict": {k: self.node(obj[k]) for k in obj}}
        raise WireError(f"cannot encode a {type(obj).__name__}: the wire format carries arrays, plain values, "
                        f"lists, dicts and the built-in interventions ({', '.join(sorted(_KINDS))}, Fn, Splice)")

    def fields(self, obj) -> dict:
        return {f.name: self.node(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}


def _is_mapping(obj) -> bool:
    import collections.abc

    return isinstance(obj, collections.abc.Mapping)


def _sae_kind(obj) -> Optional[str]:
    """'Splice', 'SAE' or 'Reads' for the SAE types (imported only when the sae package is loaded)."""
    import sys

    if "jaxinterp.sae" not in sys.modules:
        return None
    from jaxinterp.sae.families import SAE, Reads
    from jaxinterp.sae.splice import Splice

    for kind, cls in (("Splice", Splice), ("SAE", SAE), ("Reads", Reads)):
        if isinstance(obj, cls):
            return kind
    return None


def encode(obj: Any) -> bytes:
    """``obj`` (interventions, arrays, lists, dicts, plain values) as one safetensors blob."""
    writer = _Writer()
    structure = writer.node(obj)
    header: dict = {"__metadata__": {"format": FORMAT, "version": VERSION,
                                     "structure": json.dumps(structure, separators=(",", ":"))}}
    offset, chunks = 0, []
    for name, arr in writer.tensors.items():
        arr = np.ascontiguousarray(arr).reshape(np.shape(arr))  # ascontiguousarray makes a 0-d array 1-d
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        chunks.append(arr.tobytes())
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([_struct.pack("<Q", len(text)), text, *chunks])


# ----------------------------------------------------------------------------- decoding


def _read_tensors(blob: bytes, limits: Limits) -> tuple[dict, dict[str, np.ndarray]]:
    if len(blob) > limits.max_bytes:
        raise WireError(f"the blob has {len(blob)} bytes, more than the limit of {limits.max_bytes}")
    if len(blob) < 8:
        raise WireError("the blob is shorter than a safetensors header (8 bytes)")
    (n,) = _struct.unpack("<Q", blob[:8])
    if n > limits.max_header_bytes or 8 + n > len(blob):
        raise WireError(f"the safetensors header declares {n} bytes but the blob has {len(blob) - 8} after the "
                        f"length (header limit {limits.max_header_bytes})")
    try:
        header = json.loads(blob[8:8 + n])
    except (ValueError, RecursionError):
        raise WireError("the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise WireError("the safetensors header must be a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise WireError(f"not a {FORMAT} v{VERSION} blob (its __metadata__ lacks format/version)")
    data = memoryview(blob)[8 + n:]
    spans, tensors = [], {}
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = _DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            ok = (isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 1 << 40 for d in shape)
                  and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= len(data))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise WireError(f"tensor {name!r}: bad entry {str(info)[:200]} (dtype one of {sorted(_DTYPES)}, "
                            f"shape a list of ints, data_offsets within the {len(data)} data bytes)")
        if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize != end - start:
            raise WireError(f"tensor {name!r}: shape {shape} of {info['dtype']} needs "
                            f"{int(np.prod(shape, dtype=np.float64)) * dtype.itemsize} bytes, offsets give {end - start}")
        spans.append((start, end))
        tensors[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape).copy()
    covered = 0
    for start, end in sorted(spans):
        if start != covered:
            raise WireError("the tensors' data_offsets overlap or leave gaps")
        covered = end
    if covered != len(data):
        raise WireError(f"the blob has {len(data) - covered} bytes after its last tensor")
    return meta, tensors


class _Reader:
    def __init__(self, tensors: dict[str, np.ndarray], limits: Limits):
        self.tensors, self.limits, self.nodes, self.used = tensors, limits, 0, set()

    def tensor(self, name) -> np.ndarray:
        if not isinstance(name, str) or name not in self.tensors:
            raise WireError(f"the structure refers to a tensor {str(name)[:80]!r} the blob does not hold")
        self.used.add(name)
        arr = self.tensors[name]
        if arr.dtype.itemsize == 8 and arr.dtype.kind in "iu" and arr.size and not jax.config.jax_enable_x64 and (
                arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
            raise WireError(f"tensor {name!r}: {arr.dtype} values outside int32 (this process runs without x64)")
        return jnp.asarray(arr)

    def node(self, n, depth: int = 0) -> Any:
        self.nodes += 1
        if depth > self.limits.max_depth or self.nodes > self.limits.max_nodes:
            raise WireError(f"the structure is nested deeper than {self.limits.max_depth} or has more than "
                            f"{self.limits.max_nodes} nodes")
        if n is None or isinstance(n, (bool, int, float, str)):
            return n
        if not isinstance(n, dict) or not n:
            raise WireError(f"a structure node must be a JSON value or an object with one tag, got {str(n)[:80]}")
        tag = next(iter(n))
        if tag == "array" and len(n) == 1:
            return self.tensor(n["array"])
        if tag in ("list", "tuple") and len(n) == 1 and isinstance(n[tag], list):
            items = [self.node(x, depth + 1) for x in n[tag]]
            return items if tag == "list" else tuple(items)
        if tag == "dict" and len(n) == 1 and isinstance(n["dict"], dict):
            return {k: self.node(v, depth + 1) for k, v in n["dict"].items()}
        if tag == "iv":
            return self.intervention(n, depth)
        if tag == "sae":
            return self.sae(n, depth)
        if tag == "reads" and len(n) == 1:
            return self.reads(n["reads"])
        if tag == "exported" and len(n) == 1:
            return _load_module(self.module_tensor(n["exported"]), self.limits, fn=False)
        raise WireError(f"unknown structure node {str(n)[:80]} (tags: array, list, tuple, dict, iv, sae, reads, "
                        f"exported)")

    def module_tensor(self, name) -> np.ndarray:
        if not isinstance(name, str) or name not in self.tensors:
            raise WireError(f"an exported module refers to a tensor {str(name)[:80]!r} the blob does not hold")
        self.used.add(name)
        return self.tensors[name]

    def intervention(self, n: dict, depth: int):
        kind = n.get("iv")
        if kind == "Fn" and set(n) == {"iv", "module"}:
            return _load_module(self.module_tensor(n["module"]), self.limits)
        if kind == "Splice":
            from jaxinterp.sae.splice import Splice as cls
        elif kind in _KINDS:
            cls = _KINDS[kind]
        else:
            raise WireError(f"unknown intervention {str(kind)[:40]!r}; known: {', '.join(sorted(_KINDS))}, Fn, Splice")
        return self.construct(cls, n, depth, f"intervention {kind}")

    def construct(self, cls, n: dict, depth: int, what: str):
        fields = n.get("fields")
        if set(n) - {"iv", "sae", "fields"} or not isinstance(fields, dict):
            raise WireError(f"{what}: expected {{tag, \"fields\": {{...}}}}, got keys {sorted(n)[:8]}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise WireError(f"{what}: unknown fields {unknown[:8]}; its fields are {sorted(names)}")
        values = {k: self.node(v, depth + 1) for k, v in fields.items()}
        _check_field_types(cls, values, what)
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise WireError(f"{what}: {e}") from None

    def sae(self, n: dict, depth: int):
        from jaxinterp.sae.families import FAMILIES, get_family

        family = n.get("sae")
        if family not in FAMILIES:
            raise WireError(f"unknown SAE family {str(family)[:40]!r}; known: {sorted(FAMILIES)}")
        sae = self.construct(get_family(family), n, depth, f"SAE {family}")
        for part in ("params", "buffers"):
            tree = getattr(sae, part)
            if not isinstance(tree, dict) or not all(isinstance(v, jax.Array) for v in tree.values()):
                raise WireError(f"SAE {family}: {part} must be a dict of arrays")
        return sae

    def reads(self, fields):
        from jaxinterp.sae.families import Reads

        names = {f.name for f in dataclasses.fields(Reads)}
        if not isinstance(fields, dict) or set(fields) - names:
            raise WireError(f"an SAE's reads must be an object with fields among {sorted(names)}")
        return Reads(**fields)


_ARRAYISH = (jax.Array, int, float, type(None))


def _check_field_types(cls, values: dict, what: str) -> None:
    """Built-in interventions take arrays (or numbers / None) in their array fields: nothing else gets in."""
    if cls is _iv.Compose:
        items = values.get("items")
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, _iv.Intervention) for i in items):
            raise WireError(f"{what}: items must be a list of interventions")
        return
    if cls is _iv.ByLayer:
        if not isinstance(values.get("item"), _iv.Intervention):
            raise WireError(f"{what}: item must be an intervention")
        return
    if cls is _iv.Steer:  # its static fields: where (a name), prompt_len (an int or null)
        values = dict(values)
        if not isinstance(values.pop("where", "all"), str):
            raise WireError(f"{what}: where must be one of {_iv.STEER_WHERE}")
        prompt_len = values.pop("prompt_len", None)
        if prompt_len is not None and (isinstance(prompt_len, bool) or not isinstance(prompt_len, int)):
            raise WireError(f"{what}: prompt_len must be an int or null")
    if cls in _KINDS.values():
        bad = sorted(k for k, v in values.items() if isinstance(v, bool) or not isinstance(v, _ARRAYISH))
        if bad:
            raise WireError(f"{what}: fields {bad} must be arrays (or numbers / null)")


def decode(blob: bytes, limits: Limits = Limits()) -> Any:
    """The object ``encode`` wrote (arrays come back as jax arrays; interventions as themselves)."""
    meta, tensors = _read_tensors(bytes(blob), limits)
    try:
        structure = json.loads(meta.get("structure", "null"))
    except (ValueError, RecursionError, TypeError):
        raise WireError("the blob's structure is not valid JSON") from None
    reader = _Reader(tensors, limits)
    out = reader.node(structure)
    if reader.used != set(tensors):
        raise WireError(f"the blob holds tensors the structure never uses: {sorted(set(tensors) - reader.used)[:8]}")
    return out


# ----------------------------------------------------------------------------- files


def save_intervention(path: str | os.PathLike, iv: Any) -> None:
    """Write an intervention (or a list / mapping of them) to ``path`` (atomic: temp file + rename)."""
    blob = encode(iv)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_intervention(path: str | os.PathLike, limits: Limits = Limits()) -> Any:
    """Read what ``save_intervention`` wrote."""
    return decode(Path(path).read_bytes(), limits)
