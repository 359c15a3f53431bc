"""Per-family tables of the linear projections LoRA can adapt.

Each projection has a site-style name (``blocks.{i}.attn.q``, ``blocks.{i}.mlp.down``,
``blocks.{i}.mixer.in_proj``), the path of its kernel in the Flax params tree (layout
``[in, out]``, like every Flax ``Dense`` kernel), and the name of the matching module in
the Hugging Face model (used for the PEFT export). Names are chosen with the same globs
as sites: ``"blocks.*.attn.*"``, ``"blocks.[4-7].mlp.*"``.

Projection kinds per family:

  gpt2      attn.qkv (fused ``c_attn``), attn.o, mlp.up (``c_fc``), mlp.down
  llama     attn.q, attn.k, attn.v, attn.o, mlp.gate, mlp.up, mlp.down
  gpt_neox  attn.qkv (fused ``query_key_value``), attn.o, mlp.up, mlp.down
  mamba     mixer.in_proj, mixer.out_proj
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Sequence

import jax

from jaxinterp.sites import close_matches

__all__ = ["Projection", "register_projections", "projections", "select_projections"]


@dataclasses.dataclass(frozen=True)
class Projection:
    """One adaptable linear map: ``y = x @ kernel`` with ``kernel [d_in, d_out]``."""

    name: str                 # site-style name, e.g. "blocks.3.attn.o"
    layer: int
    path: tuple[str, ...]     # path of the kernel in model.params
    hf_module: str            # HF module name, e.g. "transformer.h.3.attn.c_proj"
    hf_fan_in_fan_out: bool   # HF stores the weight [in, out] (GPT-2 Conv1D) rather than [out, in]

    @property
    def module_path(self) -> tuple[str, ...]:
        """Path of the Flax module that owns the kernel (what the unmerged forward intercepts)."""
        return self.path[:-1]


# family -> (config -> [Projection])
_TABLES: dict[str, Callable[[Any], list[Projection]]] = {}


def register_projections(family: str, table: Callable[[Any], list[Projection]]) -> None:
    """Declare the adaptable projections of a family (ports without a table cannot take LoRA)."""
    _TABLES[family] = table


def _gpt2(cfg) -> list[Projection]:
    out = []
    for i in range(cfg.n_layers):
        hf = f"transformer.h.{i}"
        out += [
            Projection(f"blocks.{i}.attn.qkv", i, (f"h_{i}", "attn", "c_attn", "kernel"), f"{hf}.attn.c_attn", True),
            Projection(f"blocks.{i}.attn.o", i, (f"h_{i}", "attn", "c_proj", "kernel"), f"{hf}.attn.c_proj", True),
            Projection(f"blocks.{i}.mlp.up", i, (f"h_{i}", "mlp", "c_fc", "kernel"), f"{hf}.mlp.c_fc", True),
            Projection(f"blocks.{i}.mlp.down", i, (f"h_{i}", "mlp", "c_proj", "kernel"), f"{hf}.mlp.c_proj", True),
        ]
    return out


register_projections("gpt2", _gpt2)


def _linear_table(layer_key: str, hf_layer: str, modules: Sequence[tuple[str, str, str]]):
    """Table for ports whose HF weights are torch ``Linear`` ([out, in]): (kind, module, linear)."""

    def table(cfg) -> list[Projection]:
        out = []
        for i in range(cfg.n_layers):
            for kind, mod, lin in modules:
                out.append(Projection(f"blocks.{i}.{kind}", i, (f"{layer_key}_{i}", mod, lin, "kernel"),
                                      f"{hf_layer}.{i}.{mod}.{lin}", False))
        return out

    return table


register_projections("llama", _linear_table("layers", "model.layers", [
    ("attn.q", "self_attn", "q_proj"), ("attn.k", "self_attn", "k_proj"), ("attn.v", "self_attn", "v_proj"),
    ("attn.o", "self_attn", "o_proj"), ("mlp.gate", "mlp", "gate_proj"), ("mlp.up", "mlp", "up_proj"),
    ("mlp.down", "mlp", "down_proj")]))
register_projections("gpt_neox", _linear_table("layers", "gpt_neox.layers", [
    ("attn.qkv", "attention", "query_key_value"), ("attn.o", "attention", "dense"),
    ("mlp.up", "mlp", "dense_h_to_4h"), ("mlp.down", "mlp", "dense_4h_to_h")]))
register_projections("mamba", _linear_table("layers", "backbone.layers", [
    ("mixer.in_proj", "mixer", "in_proj"), ("mixer.out_proj", "mixer", "out_proj")]))


def _find_kernel(params: Any, candidates: Sequence[tuple[str, ...]]) -> tuple[str, ...] | None:
    for path in candidates:
        node = params
        try:
            for p in path:
                node = node[p]
        except (KeyError, TypeError):
            continue
        return path
    return None


def projections(model) -> list[Projection]:
    """Every adaptable projection of ``model`` (a ``jaxinterp.Model``), in layer order."""
    table = _TABLES.get(model.family)
    if table is None:
        raise NotImplementedError(
            f"LoRA has no projection table for model family {model.family!r}; families with one: {sorted(_TABLES)}"
            f" (add one with jaxinterp.lora.register_projections)"
        )
    projs = table(model.config)
    for p in projs:
        if _find_kernel(model.params, [p.path]) is None:
            raise AssertionError(f"LoRA table for {model.family!r} names {p.path}, which is not in the params tree")
    return projs


def select_projections(all_projs: Sequence[Projection], targets: Sequence[str],
                       layers: Sequence[int] | None) -> list[Projection]:
    """The projections matching any of the glob ``targets`` and lying in ``layers`` (None = all)."""
    names = [p.name for p in all_projs]
    chosen: set[str] = set()
    for pattern in targets:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            kinds = sorted({n.split(".", 2)[-1] for n in names})
            hint = close_matches(pattern, names)
            raise KeyError(
                f"LoRA target {pattern!r} matches no projection. Projection kinds of this model: {kinds}"
                + (f"; closest names: {hint}" if hint else "") + " (globs like 'blocks.*.attn.*' work)"
            )
        chosen.update(hits)
    n_layers = 1 + max(p.layer for p in all_projs)
    if layers is not None:
        bad = [l for l in layers if not 0 <= l < n_layers]
        if bad:
            raise ValueError(f"LoRA layers {bad} out of range: this model has layers 0..{n_layers - 1}")
    picked = [p for p in all_projs if p.name in chosen and (layers is None or p.layer in set(layers))]
    if not picked:
        raise ValueError(f"LoRA targets {list(targets)} with layers {list(layers or [])} select no projection")
    return picked
