"""The linear maps LoRA can adapt, derived from each family's projection table.

A LoRA target is one Hugging Face module at one layer (PEFT's unit): ``blocks.{i}.attn.o``,
``blocks.{i}.mlp.down``, ``blocks.{i}.mixer.in_proj``. Where the checkpoint fuses several of our
projections into one module (GPT-2's ``c_attn`` and NeoX's ``query_key_value`` hold q, k and v),
the target is the fused module (``attn.qkv``): one ``A [d_in, r]`` and one ``B [r, d_out]`` whose
output features are in the checkpoint's order, each of our projections reading its columns. So an
adapter trained here is exactly PEFT's adapter on that module. Names are globbed like sites:
``"blocks.*.attn.*"``, ``"blocks.[4-7].mlp.*"``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Optional, Sequence

import numpy as np

from jaxinterp.families import get_family
from jaxinterp.sites import close_matches

__all__ = ["LoraTarget", "projections", "select_projections", "units"]


@dataclasses.dataclass(frozen=True)
class LoraTarget:
    """One adaptable module at one layer: ``y += (alpha / r) (x A) B``.

    ``parts``: (projection name, column indices into this target's ``d_out`` or None for all),
    one per projection of the family the module feeds.
    """

    name: str                 # site-style name, e.g. "blocks.3.attn.qkv"
    layer: int
    unit: str                 # "attn.qkv"
    parts: tuple[tuple[str, Optional[tuple[int, ...]]], ...]
    hf_module: str            # HF module name, e.g. "transformer.h.3.attn.c_attn"
    hf_fan_in_fan_out: bool   # HF stores the weight [in, out] (GPT-2 Conv1D) rather than [out, in]
    d_in: int
    d_out: int


def _unit_name(names: Sequence[str]) -> str:
    if len(names) == 1:
        return names[0]
    prefix = names[0].rsplit(".", 1)[0]
    tails = [n.rsplit(".", 1)[1] for n in names]
    return f"{prefix}." + ("".join(tails) if all(len(t) == 1 for t in tails) else "_".join(tails))


def units(model) -> list[dict]:
    """The family's adaptable modules: ``{unit, parts, hf_module, fan, d_in, d_out}`` (layer-free)."""
    fam = get_family(model.family)
    table = {k: p for k, p in fam.projections(model.config).items() if p.cols is None}
    by_module: dict[str, list[str]] = {}
    for name, p in table.items():
        by_module.setdefault(p.hf_module, []).append(name)
    out = []
    for module, names in by_module.items():
        kernel = _get(model.params, table[names[0]].kernel)  # [L, d_in, d_out]
        if len(names) == 1 and table[names[0]].hf_cols is None:
            parts = ((names[0], None),)
            d_out = int(kernel.shape[-1])
        else:
            names = sorted(names, key=lambda n: table[n].hf_cols[0][0])
            parts = tuple((n, tuple(int(c) for lo, hi in table[n].hf_cols for c in range(lo, hi))) for n in names)
            d_out = sum(len(cols) for _, cols in parts)
        out.append(dict(unit=_unit_name(names), parts=parts, hf_module=module,
                        fan=table[names[0]].hf_fan_in_fan_out, d_in=int(kernel.shape[1]), d_out=d_out))
    return out


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def projections(model) -> list[LoraTarget]:
    """Every adaptable module of ``model`` at every layer, in layer order."""
    table = units(model)
    return [LoraTarget(name=f"blocks.{i}.{u['unit']}", layer=i, unit=u["unit"], parts=u["parts"],
                       hf_module=u["hf_module"].format(i=i), hf_fan_in_fan_out=u["fan"], d_in=u["d_in"],
                       d_out=u["d_out"])
            for i in range(model.config.n_layers) for u in table]


def select_projections(all_projs: Sequence[LoraTarget], targets: Sequence[str],
                       layers: Sequence[int] | None) -> list[LoraTarget]:
    """The targets matching any of the glob ``targets`` and lying in ``layers`` (None = all)."""
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


def column_index(cols: Optional[tuple[int, ...]]) -> Optional[np.ndarray]:
    return None if cols is None else np.asarray(cols, np.int32)
