"""Model-directory faults: index/shard disagreements, stale files, bad config.json and index files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from jaxinterp.hf import ConversionError, read_hf_dir, write_hf_dir, write_safetensors
from tests.faults.harness import Case, Raises, Returns, expect

TENSORS = {"w1": np.arange(4, dtype=np.float32), "w2": np.arange(6, dtype=np.float32).reshape(2, 3),
           "w3": np.full(2, 7.0, np.float32)}
CONFIG = {"model_type": "toy"}
SHARDS = {"s1.safetensors": ["w1", "w2"], "s2.safetensors": ["w3"]}


def make_dir(tmp: Path, shards=None, weight_map=None, *, index: bytes | None = None, config=CONFIG,
             tensors=TENSORS) -> Path:
    """A model directory: ``shards`` {file: [tensor names]}, an index with ``weight_map`` (None: derived
    from ``shards``; False: no index), or raw ``index`` bytes."""
    path = tmp / "model"
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    shards = SHARDS if shards is None else shards
    for fname, names in shards.items():
        write_safetensors(path / fname, {n: tensors[n] for n in names})
    if weight_map is None:
        weight_map = {n: f for f, names in shards.items() for n in names}
    if index is not None:
        (path / "model.safetensors.index.json").write_bytes(index)
    elif weight_map is not False:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def wm(**changes) -> dict:
    """The correct weight map with some entries changed (value None removes the entry)."""
    out = {n: f for f, names in SHARDS.items() for n in names}
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def bad(case_id: str, make, match: str, exc=ConversionError) -> Case:
    return Case(f"dir-{case_id}", lambda tmp: read_hf_dir(make(tmp)), Raises(exc, match))


def _then(make, fn):
    def run(tmp: Path) -> Path:
        path = make(tmp)
        fn(path)
        return path
    return run


def _fifo_at(name: str):
    def fn(path: Path) -> None:
        target = path / name
        if target.exists():
            target.unlink()
        os.mkfifo(target)
    return fn


def _expect_all(result, tmp) -> None:
    config, tensors = result
    expect(config == CONFIG, config)
    expect(sorted(tensors) == sorted(TENSORS), sorted(tensors))
    for k, v in TENSORS.items():
        np.testing.assert_array_equal(tensors[k], v)


def _stale_index_after_rewrite(tmp: Path) -> Path:
    """The state issue 24 found after a non-atomic re-export: a single new model.safetensors next to the
    old shards and their index (the old writer overwrote in place)."""
    path = tmp / "model"
    write_hf_dir(path, CONFIG, {k: v + 100 for k, v in TENSORS.items()}, max_shard_bytes=20)
    write_safetensors(path / "model.safetensors", TENSORS)
    return path


def _truncate(name: str, keep: int):
    def fn(path: Path) -> None:
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[:keep])
    return fn


CASES = [
    bad("index-names-missing-shard", lambda t: make_dir(t, weight_map=wm(w3="s3.safetensors")),
        r"(?=.*s3\.safetensors)(?=.*(missing|not exist|not found))"),
    bad("stray-shard-not-in-index", _then(make_dir, lambda p: write_safetensors(p / "old-00003.safetensors",
                                                                               {"w9": TENSORS["w1"]})),
        r"old-00003\.safetensors.*not named by the index"),
    bad("stale-single-file-beside-index", _stale_index_after_rewrite, r"not named by the index"),
    bad("index-assigns-wrong-shard", lambda t: make_dir(t, weight_map=wm(w1="s2.safetensors")),
        r"'w1'.*s1\.safetensors.*s2\.safetensors|'w1'.*s2\.safetensors.*s1\.safetensors"),
    bad("shard-holds-unlisted-tensor", lambda t: make_dir(t, weight_map=wm(w2=None)),
        r"(?=.*index)(?=.*'w2')(?=.*s1\.safetensors)"),
    bad("index-lists-absent-tensor", lambda t: make_dir(t, weight_map=wm(w7="s1.safetensors")),
        r"'w7'.*s1\.safetensors"),
    bad("index-invalid-json", lambda t: make_dir(t, index=b'{"weight_map": {'), r"index\.json.*JSON"),
    bad("index-empty-file", lambda t: make_dir(t, index=b""), r"index\.json.*JSON"),
    bad("index-no-weight-map", lambda t: make_dir(t, index=b'{"metadata": {}}'), r"index\.json.*weight_map"),
    bad("index-is-list", lambda t: make_dir(t, index=b"[]"), r"index\.json.*weight_map"),
    bad("weight-map-is-list", lambda t: make_dir(t, index=b'{"weight_map": ["s1.safetensors"]}'),
        r"index\.json.*weight_map"),
    bad("weight-map-value-not-string", lambda t: make_dir(t, weight_map=wm(w1=3)), r"index\.json.*'w1'"),
    bad("weight-map-path-traversal", _then(lambda t: make_dir(t, weight_map=wm(w3="../s2.safetensors")),
                                           lambda p: write_safetensors(p.parent / "s2.safetensors",
                                                                       {"w3": TENSORS["w3"]})),
        r"\.\./s2\.safetensors"),
    bad("weight-map-absolute-path", lambda t: make_dir(t, weight_map=wm(w3=str(t / "model" / "s2.safetensors"))),
        r"(?=.*s2\.safetensors)(?=.*(file name|directory))"),
    bad("weight-map-subdirectory", lambda t: make_dir(t, weight_map=wm(w3="sub/s2.safetensors")),
        r"sub/s2\.safetensors"),
    bad("empty-weight-map", lambda t: make_dir(t, weight_map={}), r"not named by the index"),
    bad("index-is-fifo", _then(make_dir, _fifo_at("model.safetensors.index.json")), r"index\.json.*not a regular"),
    bad("config-is-fifo", _then(make_dir, _fifo_at("config.json")), r"config\.json.*not a regular"),
    bad("config-is-directory", _then(lambda t: make_dir(t, config=None), lambda p: (p / "config.json").mkdir()),
        r"config\.json.*not a regular"),
    bad("config-invalid-json", _then(make_dir, lambda p: (p / "config.json").write_text('{"model_type": ')),
        r"config\.json.*JSON"),
    bad("config-not-object", _then(make_dir, lambda p: (p / "config.json").write_text('["gpt2"]')),
        r"config\.json.*JSON object"),
    bad("config-missing", lambda t: make_dir(t, config=None), r"config\.json", exc=FileNotFoundError),
    bad("shard-is-fifo", _then(make_dir, _fifo_at("s2.safetensors")), r"s2\.safetensors.*not a regular"),
    bad("shard-is-directory", _then(lambda t: make_dir(t, weight_map=False, shards={"model.safetensors": list(TENSORS)}),
                                    lambda p: (p / "extra.safetensors").mkdir()),
        r"extra\.safetensors"),
    bad("shard-truncated", _then(make_dir, _truncate("s1.safetensors", 60)), r"s1\.safetensors"),
    bad("two-files-no-index", lambda t: make_dir(t, weight_map=False), r"s1\.safetensors.*s2\.safetensors.*index"),
    bad("duplicate-across-shards-no-index", lambda t: make_dir(
        t, shards={"model.safetensors": list(TENSORS), "model-2.safetensors": ["w1"]}, weight_map=False),
        r"index|more than one"),
    bad("only-pickles", _then(lambda t: make_dir(t, shards={}, weight_map=False),
                              lambda p: (p / "pytorch_model.bin").write_bytes(b"")),
        r"pickled weights are not loaded", exc=FileNotFoundError),
    Case("dir-ok-sharded", lambda t: read_hf_dir(make_dir(t)), Returns(_expect_all)),
    Case("dir-ok-single-file", lambda t: read_hf_dir(make_dir(
        t, shards={"model.safetensors": list(TENSORS)}, weight_map=False)), Returns(_expect_all)),
    Case("dir-ok-single-file-with-index", lambda t: read_hf_dir(make_dir(
        t, shards={"model.safetensors": list(TENSORS)})), Returns(_expect_all)),
]
