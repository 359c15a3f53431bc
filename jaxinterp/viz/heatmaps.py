"""Attention patterns as PNG heatmaps: one image per layer, one panel per head."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from jaxinterp.model import Model
from jaxinterp.viz.data import view_data

__all__ = ["plot_heads", "attention_heatmaps"]

MAX_LABELLED = 48  # longer sequences get no per-token tick labels


def plot_heads(patterns: np.ndarray, labels: Sequence[str], title: str):
    """A matplotlib ``Figure``: ``patterns [H, Tq, Tk]`` as a grid of heatmaps (query rows, key columns)."""
    from matplotlib.figure import Figure

    n_heads, t = patterns.shape[0], patterns.shape[-1]
    cols = math.ceil(math.sqrt(n_heads))
    rows = math.ceil(n_heads / cols)
    size = 1.6 + 0.14 * min(t, MAX_LABELLED)
    fig = Figure(figsize=(cols * size + 0.8, rows * size + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for h, ax in enumerate(axes.ravel()):
        if h >= n_heads:
            ax.axis("off")
            continue
        image = ax.imshow(patterns[h], cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=9)
        if t <= MAX_LABELLED:
            ax.set_xticks(range(t), [repr(s)[1:-1] for s in labels], rotation=90, fontsize=6)
            ax.set_yticks(range(t), [repr(s)[1:-1] for s in labels], fontsize=6)
        if h // cols == rows - 1 or h + cols >= n_heads:
            ax.set_xlabel("key", fontsize=7)
        if h % cols == 0:
            ax.set_ylabel("query", fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="attention")
    return fig


def attention_heatmaps(model: Model, tokens, out_dir, *, layers: Optional[Sequence[int]] = None,
                       dpi: int = 110) -> list[Path]:
    """Write ``layer{i}.png`` (all heads of layer ``i``) for one sequence; returns the paths."""
    data = view_data(model, tokens, top_k=1)
    if data.patterns is None:
        raise ValueError(f"model family {model.family!r} has no attention patterns to draw")
    n = model.config.n_layers
    layers = range(n) if layers is None else layers
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for layer in layers:
        if not -n <= layer < n:
            raise ValueError(f"layers must lie in [{-n}, {n}), got {layer}")
        layer = layer % n
        fig = plot_heads(data.patterns[layer], data.labels, f"layer {layer} attention")
        path = out_dir / f"layer{layer}.png"
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        tmp.replace(path)
        paths.append(path)
    return paths
