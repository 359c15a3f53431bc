"""A circuit as a graph: thresholded nodes and edges, written as JSON and drawn as PNG / SVG.

    circuit, effects = discover(model, saes, tokens, metric, patch=corrupt, node_threshold=0.1,
                                edge_threshold=0.01, metric_args=(good, bad))
    circuit.save_json("circuit.json"); circuit.render("circuit.png"); circuit.render("circuit.svg")

Nodes are kept where ``|effect| > node_threshold`` (at most ``max_nodes_per_site`` per site, the
largest first); edges between kept nodes (and into the metric node ``y``) where
``|IE| > edge_threshold`` (Marks et al. defaults 0.1 and 0.01, in the metric's units). The drawing
puts each site on a row in model order (the metric on top), nodes ordered by effect; a node's
colour is the sign of its effect (blue +, red -), its shade the size; an edge's width is ``|IE|``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .edges import Y, edge_effects
from .effects import Effects, Node, node_effects

__all__ = ["Circuit", "discover", "select_nodes"]


@dataclasses.dataclass
class Circuit:
    """Nodes ``{Node: effect}``, edges ``{(upstream, downstream): IE}`` (``Y`` is the metric), the site
    order, optional node ``labels`` (e.g. a feature's top tokens) and ``info`` (metric values, thresholds)."""

    nodes: dict
    edges: dict
    sites: tuple
    labels: dict = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        node_list = [{"id": str(n), "site": n.site, "index": None if n.is_error else n.index,
                      "kind": "error" if n.is_error else "feature", "pos": n.pos, "effect": v,
                      **({"label": self.labels[n]} if n in self.labels else {})}
                     for n, v in self.nodes.items()]
        node_list.append({"id": "y", "site": "y", "index": None, "kind": "metric", "pos": None,
                          "effect": self.info.get("m_clean")})
        edge_list = [{"source": str(u), "target": "y" if d == Y else str(d), "effect": w}
                     for (u, d), w in self.edges.items()]
        return {"sites": list(self.sites), "info": self.info, "nodes": node_list, "edges": edge_list}

    def save_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(tmp, path)
        return path

    def render(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Draw the graph to ``path`` (``.png`` or ``.svg``), written atomically."""
        path = Path(path)
        if path.suffix not in (".png", ".svg"):
            raise ValueError(f"render writes .png or .svg files, got {path.name!r}")
        fig = _draw(self, title)
        tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
        fig.savefig(tmp, dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)
        os.replace(tmp, path)
        return path


def _draw(circuit: Circuit, title: str | None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in circuit.sites if any(n.site == s for n in circuit.nodes)] + ["y"]
    per_row = {s: sorted((n for n in circuit.nodes if n.site == s), key=lambda n: -circuit.nodes[n]) for s in rows[:-1]}
    per_row["y"] = [Y]
    width = max(len(v) for v in per_row.values())
    fig, ax = plt.subplots(figsize=(max(6.0, 1.15 * width + 2.5), max(3.0, 1.0 * len(rows) + 1.0)))
    pos = {}
    for r, s in enumerate(rows):
        nodes = per_row[s]
        for j, n in enumerate(nodes):
            pos[n] = (j - (len(nodes) - 1) / 2, r)
    top = max([abs(v) for v in circuit.nodes.values()] + [1e-12])
    top_e = max([abs(w) for w in circuit.edges.values()] + [1e-12])
    for (u, d), w in sorted(circuit.edges.items(), key=lambda kv: abs(kv[1])):
        if u in pos and d in pos:
            (x0, y0), (x1, y1) = pos[u], pos[d]
            ax.plot([x0, x1], [y0, y1], color="#1f5fbf" if w > 0 else "#c0392b", alpha=0.55,
                    lw=0.4 + 4.0 * abs(w) / top_e, zorder=1)
    for n, (x, y) in pos.items():
        v = circuit.info.get("m_clean", 0.0) if n == Y else circuit.nodes[n]
        shade = 0.25 + 0.75 * min(1.0, abs(v) / top) if n != Y else 1.0
        color = (0.12, 0.37, 0.75, shade) if v >= 0 else (0.75, 0.22, 0.17, shade)
        label = "y" if n == Y else circuit.labels.get(n, "err" if n.is_error else str(n.index))
        label = label if n.pos is None or n == Y else f"{label}@{n.pos}"
        ax.text(x, y, label, ha="center", va="center", fontsize=7, zorder=3, color="white" if shade > 0.6 else "black",
                bbox=dict(boxstyle="round,pad=0.25", fc=color, ec="black" if n.is_error and n != Y else "none",
                          lw=0.8, ls="--"))
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([circuit.info.get("metric_name", "metric") if s == "y" else s for s in rows], fontsize=8)
    ax.set_xticks([])
    ax.set_xlim(-width / 2 - 0.3, width / 2 + 0.3)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title(title or circuit.info.get("title", "circuit"), fontsize=9)
    ax.text(1.0, -0.02, "node: blue = patching it raises the metric, red = lowers it, shade = |effect|; dashed box = "
            "SAE error; edge width = |IE|", transform=ax.transAxes, ha="right", va="top", fontsize=6.5, color="0.3")
    fig.tight_layout()
    return fig


def select_nodes(effects: Effects, node_threshold: float, max_nodes_per_site: int | None = None) -> dict[Node, float]:
    """Nodes with ``|effect| > node_threshold`` (the largest ``max_nodes_per_site`` of each site)."""
    kept: dict[Node, float] = {}
    per_site: dict[str, int] = {}
    for n, v in effects.ranked():
        if abs(v) <= node_threshold:
            break
        if max_nodes_per_site is not None and per_site.get(n.site, 0) >= max_nodes_per_site:
            continue
        per_site[n.site] = per_site.get(n.site, 0) + 1
        kept[n] = v
    return kept


def discover(model, dictionaries: Mapping[str, Any], tokens, metric: Callable, *, patch="zero",
             node_threshold: float = 0.1, edge_threshold: float = 0.01, max_nodes_per_site: int | None = None,
             method: str = "ig", steps: int = 10, metric_args: tuple = (), attention_mask=None,
             readout: str | None = None, per_position: bool = False, effects: Effects | None = None,
             labels: Mapping[Node, str] | None = None) -> tuple[Circuit, Effects]:
    """Node effects (``node_effects``), the nodes above ``node_threshold``, their edges above
    ``edge_threshold`` (``edge_effects``): ``(Circuit, Effects)``. Pass ``effects`` to reuse them."""
    if node_threshold < 0 or edge_threshold < 0:
        raise ValueError(f"thresholds must be >= 0, got node {node_threshold}, edge {edge_threshold}")
    if effects is None:
        effects = node_effects(model, dictionaries, tokens, metric, patch=patch, method=method, steps=steps,
                               metric_args=metric_args, attention_mask=attention_mask, readout=readout,
                               per_position=per_position)
    nodes = select_nodes(effects, node_threshold, max_nodes_per_site)
    edges = edge_effects(model, dictionaries, tokens, effects, list(nodes), metric=metric, metric_args=metric_args,
                         attention_mask=attention_mask, readout=readout)
    edges = {k: w for k, w in edges.items() if abs(w) > edge_threshold}
    info = {"m_clean": effects.m_clean, "m_patch": effects.m_patch, "method": effects.method, "steps": effects.steps,
            "node_threshold": node_threshold, "edge_threshold": edge_threshold, "n_nodes": len(nodes),
            "n_edges": len(edges)}
    return Circuit(nodes, edges, effects.sites, dict(labels or {}), info), effects
