"""Non-finite weights: reported by tensor name at load (a warning; ``strict=True`` makes it an error)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

import jaxinterp as ji
from jaxinterp.hf import ConversionError, read_hf_dir, write_hf_dir
from tests.faults.harness import Case, Raises, Returns, expect
from tests.faults.models import tiny, warm

GOOD = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16), "i": np.arange(3),
        "h": np.ones(3, ml_dtypes.bfloat16)}


def poisoned(**bad_values) -> dict:
    """GOOD with some tensors' first (or given) element set to a non-finite value."""
    out = {k: v.copy() for k, v in GOOD.items()}
    for name, value in bad_values.items():
        out[name].reshape(-1)[0] = value
    return out


def write(tmp: Path, tensors: dict, max_shard_bytes=None) -> Path:
    write_hf_dir(tmp / "m", {"model_type": "toy"}, tensors, max_shard_bytes=max_shard_bytes)
    return tmp / "m"


def faithful(tensors: dict):
    """The loaded tensors are exactly what was written (NaN where NaN was written)."""
    def check(result, tmp):
        _, got = result
        for k, v in tensors.items():
            np.testing.assert_array_equal(np.asarray(got[k]), v)  # assert_array_equal treats NaN == NaN
    return check


def warn_case(case_id: str, tensors: dict, match: str, **kw) -> Case:
    return Case(f"nan-warn-{case_id}", lambda t: read_hf_dir(write(t, tensors, **kw)),
                Returns(faithful(tensors), warns=match))


def strict_case(case_id: str, tensors: dict, match: str, **kw) -> Case:
    return Case(f"nan-strict-{case_id}", lambda t: read_hf_dir(write(t, tensors, **kw), strict=True),
                Raises(ConversionError, match))


MANY = {f"layer{i:03d}.w": np.full(2, np.nan, np.float32) for i in range(60)}
BIG = np.zeros(3_000_001, np.float32)
BIG[-1] = np.inf  # at the very end: a chunked scan must reach it


def _load_poisoned_model(tmp: Path, strict: bool = False):
    ji.save_pretrained(tiny(1), tmp / "m")
    _, tensors = read_hf_dir(tmp / "m")
    tensors = {k: np.array(v) for k, v in tensors.items()}
    tensors["transformer.h.0.mlp.c_fc.weight"][3, 5] = np.nan
    write_hf_dir(tmp / "m2", json.loads((tmp / "m" / "config.json").read_text()), tensors)
    return ji.load(tmp / "m2", strict=strict)


def _nan_where_written(model, tmp) -> None:
    leaves = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(model.params)}
    nan = {k: int(np.isnan(v).sum()) for k, v in leaves.items() if np.isnan(v).any()}
    expect(list(nan.values()) == [1], nan)


CASES = [
    warn_case("nan-f32", poisoned(a=np.nan), r"non-finite.*'a'"),
    warn_case("inf-f16", poisoned(b=np.inf), r"non-finite.*'b'"),
    warn_case("neg-inf-bf16", poisoned(h=-np.inf), r"non-finite.*'h'"),
    warn_case("two-tensors", poisoned(a=np.nan, h=np.nan), r"non-finite.*'a'.*'h'"),
    warn_case("sixty-tensors-capped", MANY, r"non-finite.*60 tensors.*and \d+ more"),
    warn_case("inf-at-end-of-big-tensor", {"big": BIG}, r"non-finite.*'big'"),
    warn_case("nan-in-second-shard", poisoned(i=0, h=np.nan), r"non-finite.*'h'", max_shard_bytes=40),
    strict_case("nan-f32", poisoned(a=np.nan), r"non-finite.*'a'"),
    strict_case("inf-f16", poisoned(b=-np.inf), r"non-finite.*'b'"),
    strict_case("nan-bf16", poisoned(h=np.nan), r"non-finite.*'h'"),
    strict_case("sixty-tensors-capped", MANY, r"non-finite.*and \d+ more"),
    Case("nan-ok-finite-is-quiet", lambda t: read_hf_dir(write(t, GOOD), strict=True), Returns(faithful(GOOD))),
    Case("nan-ok-int-tensors-ignored", lambda t: read_hf_dir(write(t, {"i": np.array([2**31 - 1, -5])}), strict=True),
         Returns(faithful({"i": np.array([2**31 - 1, -5])}))),
    Case("nan-load-warns-by-name", _load_poisoned_model,
         Returns(_nan_where_written, warns=r"non-finite.*'transformer\.h\.0\.mlp\.c_fc\.weight'"), setup=warm),
    Case("nan-load-strict-refuses", lambda t: _load_poisoned_model(t, strict=True),
         Raises(ConversionError, r"non-finite.*'transformer\.h\.0\.mlp\.c_fc\.weight'.*strict=True"), setup=warm),
]
