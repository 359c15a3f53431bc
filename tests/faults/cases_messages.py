"""Error messages stay short: long lists are capped ("... and N more"), values are not dumped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import jaxinterp as ji
from jaxinterp.hf import ConversionError, check_config_fields, check_tensors, read_hf_dir, write_safetensors
from tests.faults.harness import Case, Raises
from tests.faults.models import tiny, warm

NAMES = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2000)]
ARR = np.zeros((2, 2), np.float32)


def _load_with_config(**changes):
    def run(tmp: Path):
        ji.save_pretrained(tiny(1), tmp / "m")
        config = json.loads((tmp / "m" / "config.json").read_text())
        (tmp / "m" / "config.json").write_text(json.dumps({**config, **changes}))
        ji.load(tmp / "m")
    return run


def _index_missing_many(tmp: Path):
    path = tmp / "m"
    path.mkdir()
    (path / "config.json").write_text("{}")
    write_safetensors(path / "s.safetensors", {"a": ARR})
    weight_map = {"a": "s.safetensors", **{n: "s.safetensors" for n in NAMES}}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    read_hf_dir(path)


def _duplicates_many(tmp: Path):
    path = tmp / "m"
    path.mkdir()
    (path / "config.json").write_text("{}")
    write_safetensors(path / "s1.safetensors", {n: ARR for n in NAMES[:500]})
    write_safetensors(path / "s2.safetensors", {n: ARR for n in NAMES[:500]})  # both shards hold every tensor
    weight_map = {n: "s1.safetensors" if i < 250 else "s2.safetensors" for i, n in enumerate(NAMES[:500])}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    read_hf_dir(path)


CASES = [
    Case("msg-check-tensors-missing", lambda t: check_tensors("llama", {n: (2, 2) for n in NAMES}, {}),
         Raises(ConversionError, r"missing tensors.*and \d+ more")),
    Case("msg-check-tensors-unexpected", lambda t: check_tensors("llama", {}, {n: ARR for n in NAMES}),
         Raises(ConversionError, r"unexpected tensors.*and \d+ more")),
    Case("msg-check-tensors-misshaped", lambda t: check_tensors("llama", {n: (3, 3) for n in NAMES},
                                                                {n: ARR for n in NAMES}),
         Raises(ConversionError, r"mis-shaped.*and \d+ more")),
    Case("msg-check-config-fields", lambda t: check_config_fields("gpt2", {f"field_{i}": 1 for i in range(500)},
                                                                  [f"known_{i}" for i in range(300)]),
         Raises(ConversionError, r"field_0.*and \d+ more")),
    Case("msg-load-config-30-layers", _load_with_config(n_layer=30),  # a 1,000-layer config made 430 KB
         Raises(ConversionError, r"missing tensors.*and \d+ more"), setup=warm),
    Case("msg-index-lists-many-absent", _index_missing_many, Raises(ConversionError, r"and \d+ more")),
    Case("msg-duplicates-across-shards", _duplicates_many, Raises(ConversionError, r"and \d+ more")),
    Case("msg-config-value-repr-capped", lambda t: check_config_fields("gpt2", {"x" * 5000: 1}, []),
         Raises(ConversionError, r"xxx")),
    Case("msg-positions-mask", lambda t: ji.positions_mask(4, list(range(20000))),
         Raises(IndexError, r"(?=.*out of range)(?=.*and \d+ more)")),
    Case("msg-heads-mask", lambda t: ji.heads_mask(4, 2, list(range(20000))),
         Raises(IndexError, r"(?=.*out of range)(?=.*and \d+ more)")),
]
