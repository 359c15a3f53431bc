"""Sharded experiments: split a dataset of prompts across the mesh and gather the tables.

``run_prompts`` is the generic runner: ``fn(shared, item) -> {name: array}`` is applied to
every row of a dataset, rows split over the mesh's data axes (every process holds the same
deterministic dataset and places only its slices), in host batches with a progress bar,
and the per-prompt tables come back stacked on the host. ``patching_tables`` and
``causal_trace_tables`` are the two experiments wired to it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxinterp.interventions import Patch
from jaxinterp.model import Model, run
from jaxinterp.sharding.place import activation_constraint
from jaxinterp.sharding.rules import Rules, load_rules
from jaxinterp.sharding.workloads import SWEEP_AXES, sharded_map, sweep_axes_size

__all__ = ["run_prompts", "patching_tables", "causal_trace_tables"]


def run_prompts(fn: Callable[[Any, Any], Mapping[str, jax.Array]], shared: Any, dataset: Mapping[str, np.ndarray],
                mesh: Mesh, *, axes: Sequence[str] = SWEEP_AXES, batch_size: Optional[int] = None,
                progress: bool = True, desc: str = "prompts") -> dict[str, np.ndarray]:
    """Apply ``fn(shared, row)`` to every row of ``dataset`` (arrays with a common leading N).

    ``batch_size`` rows go through one program call (rounded up to a multiple of the sweep
    devices; default: everything at once). Returns ``{name: [N, ...]}`` numpy tables, the
    same on every process.
    """
    n = len(next(iter(dataset.values())))
    if any(len(v) != n for v in dataset.values()):
        raise ValueError(f"dataset columns differ in length: { {k: len(v) for k, v in dataset.items()} }")
    n_dev = sweep_axes_size(mesh, axes)
    step = n if batch_size is None else -(-batch_size // n_dev) * n_dev
    parts: list[dict[str, np.ndarray]] = []
    bar = tqdm(total=n, desc=desc, disable=not progress or jax.process_index() != 0)
    for start in range(0, n, step):
        rows = {k: np.asarray(v[start:start + step]) for k, v in dataset.items()}
        parts.append(sharded_map(fn, shared, rows, mesh, axes))
        bar.update(len(next(iter(rows.values()))))
    bar.close()
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _patch_one(model: Model, row, *, site_template: str, n_layers: int, constrain):
    """Table [L, T] of the answer-minus-foil logit difference after patching the clean
    ``site_template`` value at (layer, position) into the corrupted run of one prompt."""
    clean, corrupt, answer, foil = row["clean"], row["corrupt"], row["answer"], row["foil"]
    t = clean.shape[0]
    sites = [site_template.format(l) for l in range(n_layers)]
    last = t - 1

    def diff(logits):  # [1, V] -> scalar
        return logits[0, answer] - logits[0, foil]

    ref = run(model, clean[None], capture=sites, logits_at=last, constrain=constrain)
    bad = run(model, corrupt[None], logits_at=last, constrain=constrain)
    cells = jnp.eye(n_layers * t, dtype=bool).reshape(n_layers * t, n_layers, 1, t)  # [L*T, L, 1, T]

    def patched(cell):
        ivs = {s: Patch(values=ref.cache[s], mask=cell[l]) for l, s in enumerate(sites)}
        return diff(run(model, corrupt[None], interventions=ivs, logits_at=last, constrain=constrain).logits)

    table = jax.vmap(patched)(cells).reshape(n_layers, t)
    return {"table": table, "clean": diff(ref.logits), "corrupt": diff(bad.logits)}


def patching_tables(model: Model, clean, corrupt, answer, foil, mesh: Mesh, rules: Rules | str, *,
                    site_template: str = "blocks.{}.resid_pre", axes: Sequence[str] = SWEEP_AXES,
                    batch_size: Optional[int] = None, progress: bool = True) -> dict[str, np.ndarray]:
    """Activation patching of many prompt pairs, prompts split over the mesh.

    For prompt i and every (layer l, position t): the logit difference ``answer - foil`` at
    the last position when ``site_template.format(l)`` at t is patched from the clean run into
    the corrupted run. Returns ``{"table": [N, L, T], "clean": [N], "corrupt": [N]}``.
    """
    rules = load_rules(rules)
    constrain = activation_constraint(mesh, rules.without(axes))
    fn = functools.partial(_patch_one, site_template=site_template, n_layers=model.config.n_layers,
                           constrain=constrain)
    data = {"clean": np.asarray(clean, np.int32), "corrupt": np.asarray(corrupt, np.int32),
            "answer": np.asarray(answer, np.int32), "foil": np.asarray(foil, np.int32)}
    return run_prompts(lambda m, row: fn(m, row), model, data, mesh, axes=axes, batch_size=batch_size,
                       progress=progress, desc="patching")


def causal_trace_tables(model: Model, tokens, subjects: Sequence[Sequence[int]], mesh: Mesh, *, sigma: float,
                        kind: str = "resid_post", freeze: Optional[str] = None, answers=None, config=None,
                        axes: Sequence[str] = SWEEP_AXES, batch_size: Optional[int] = None,
                        progress: bool = True) -> dict[str, np.ndarray]:
    """ROME causal tracing (``jaxinterp.patching.causal_trace``) of many facts, split over the mesh.

    Same corruption, engines and tables as ``causal_trace.trace_batch``; returns
    ``{"probs": [N, T, L], "p_clean": [N], "p_corrupt": [N], "answer": [N]}``.
    """
    from jaxinterp.patching import causal_trace as ct

    batch = ct.prepare_batch(model, tokens, subjects, kind=kind, sigma=sigma, freeze=freeze, answers=answers,
                             config=config or ct.TraceConfig())
    table = batch.plan.table

    def fn(m, row):
        corruption = ct.Corruption(row["corrupt_tokens"], row["delta"])
        probs, p_clean, p_corrupt, ans = table(m, row["tokens"], corruption, row["answer"])
        return {"probs": probs, "p_clean": p_clean, "p_corrupt": p_corrupt, "answer": ans}

    data = {"tokens": batch.tokens, "corrupt_tokens": np.asarray(batch.corruption.tokens),
            "delta": np.asarray(batch.corruption.delta), "answer": batch.answers}
    return run_prompts(fn, model, data, mesh, axes=axes, batch_size=batch_size, progress=progress,
                       desc="causal tracing")
